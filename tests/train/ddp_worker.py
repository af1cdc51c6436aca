"""One rank of test_ddp's multi-process run: the production entry (`python -m trainer run SPEC`, which
the job launcher starts under `accelerate launch --multi_gpu`) with probes around it.

    accelerate launch --multi_gpu --num_processes 2 … tests/train/ddp_worker.py SPEC PROBE_DIR

The probes wrap `run_training` and `generate_samples` (the train job imports both at call time) and write,
per rank, into PROBE_DIR:
- init<rank>.safetensors / final<rank>.safetensors: the adapter's tensors before and after training,
  as the final adapter file stores them (fp32);
- rank<rank>.json: the image keys of every micro-batch this rank loaded, its loss history, the files
  run_training reports as saved, the sample images this rank rendered, and the rank/world accelerate saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main(spec_path: str, probe_dir: str) -> int:
    import torch
    from safetensors.torch import save_file

    import trainer.sampling.samples as samples_module
    import trainer.train.recipe as recipe

    probe = Path(probe_dir)
    probe.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, Any] = {"rank": rank, "batches": [], "samples": []}
    real_run_training, real_generate_samples = recipe.run_training, samples_module.generate_samples

    def run_training(spec: Any, parts: Any, network: Any, dataset: Any, **kwargs: Any) -> Any:
        real_load_batch = dataset.load_batch

        def load_batch(refs: Any, **kw: Any) -> Any:
            batch = real_load_batch(refs, **kw)
            record["batches"].append(list(batch.image_keys))
            return batch

        dataset.load_batch = load_batch
        save_file(network.state_dict_for_save(torch.float32), str(probe / f"init{rank}.safetensors"))
        result = real_run_training(spec, parts, network, dataset, **kwargs)
        from accelerate.state import PartialState

        state = PartialState()
        record.update(process_index=state.process_index, num_processes=state.num_processes,
                      backend=str(state.backend), device=str(state.device), losses=result.loss_history,
                      steps_done=result.steps_done, final_path=result.final_path, saved_files=result.saved_files)
        save_file(network.state_dict_for_save(torch.float32), str(probe / f"final{rank}.safetensors"))
        return result

    def generate_samples(*args: Any, **kwargs: Any) -> Any:
        written = real_generate_samples(*args, **kwargs)
        record["samples"] += [str(Path(p).relative_to(Path(p).parent.parent)) for p in written]
        return written

    recipe.run_training = run_training
    samples_module.generate_samples = generate_samples
    from trainer.job.run import main as run_main

    code = run_main([spec_path])
    record["exit_code"] = code
    (probe / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
