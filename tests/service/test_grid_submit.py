"""A grid job's inputs checked at submit: a job that has not finished, an unknown job and a weight out
of range are each a 422 naming the field; nothing is launched."""

from __future__ import annotations

from tests.service.conftest import auth, spec, upload_tiny_dataset


def _grid(bucket: str, adapters: list[dict], **axes) -> dict:
    return {"spec": {"version": 1, "kind": "grid", "model": {"uri": f"s3://{bucket}/models/tiny"},
                     "grid": {"adapters": adapters, "prompts": ["a cat --w 64 --h 64 --s 2"], **axes},
                     "resources": {"gpus": 0}}}


def test_grid_over_an_unfinished_job_and_a_weight_out_of_range_are_422(client_factory, bucket, s3):
    upload_tiny_dataset(s3, bucket)
    client = client_factory(launcher="none", reconcile_interval_s=0)
    r = client.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth())
    assert r.status_code == 201, r.text
    queued = r.json()["id"]
    r = client.post("/v1/jobs", json=_grid(bucket, [{"job": queued}]), headers=auth())
    assert r.status_code == 422, r.text
    problems = r.json()["problems"]
    assert problems[0]["path"] == "grid.adapters[0].job" and "queued, not succeeded" in problems[0]["message"]
    r = client.post("/v1/jobs", json=_grid(bucket, [{"job": "j-20250101t120000-0123abcd"}]), headers=auth())
    assert r.status_code == 422 and "no job" in r.text, r.text
    r = client.post("/v1/jobs", json=_grid(bucket, [{"uri": f"s3://{bucket}/models/a.safetensors"}],
                                           weights=[0.5, 11.0]), headers=auth())
    assert r.status_code == 422 and "grid.weights[1]" in r.text, r.text
    r = client.post("/v1/jobs", json=_grid(bucket, [{"uri": f"s3://{bucket}/models/a.safetensors"}], x="seed",
                                           y="seed"), headers=auth())
    assert r.status_code == 422 and "grid.y" in r.text, r.text
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth()).json()["items"]] == [queued]


def test_lathe_grid_builds_the_grid_spec():
    from service.cli import build_parser
    from service.cli_submit import grid_spec
    from trainer.core.spec import spec_from_obj

    args = build_parser().parse_args(["grid", "j-20250101t120000-0123abcd", "s3://b/x.safetensors", "--model", "s3://b/base",
                                      "--prompt", "a cat --w 64 --h 64", "-x", "weight", "-y", "saves",
                                      "--weights", "0.5,1,1.5", "--gpus", "0"])
    spec = grid_spec(args, client=None)
    assert spec["grid"]["adapters"] == [{"job": "j-20250101t120000-0123abcd"}, {"uri": "s3://b/x.safetensors"}]
    assert spec["grid"]["weights"] == [0.5, 1.0, 1.5] and (spec["grid"]["x"], spec["grid"]["y"]) == ("weight", "saves")
    assert spec_from_obj(spec).grid.prompts == ["a cat --w 64 --h 64"]


def test_grid_sections_are_checked_with_the_spec():
    from trainer.core.spec import SpecError, spec_from_obj

    def problems(obj: dict) -> dict[str, str]:
        try:
            spec_from_obj(obj)
        except SpecError as exc:
            return {p.path: p.message for p in exc.problems}
        return {}

    model = {"uri": "s3://m/base"}
    grid = {"adapters": [{"uri": "s3://o/a.safetensors"}, {"uri": "s3://o/b.safetensors"}], "prompts": ["a cat"]}
    assert problems({"version": 1, "kind": "grid", "model": model, "grid": grid}) == {}
    assert "grid" in problems({"version": 1, "kind": "grid", "model": model})
    assert "grid.adapters" in problems({"version": 1, "kind": "grid", "model": model, "grid": {**grid, "x": "seed",
                                                                                               "seeds": [1, 2]}})
    assert "grid.adapters[0]" in problems({"version": 1, "kind": "grid", "model": model,
                                           "grid": {**grid, "adapters": [{}]}})
    assert "grid.seeds" in problems({"version": 1, "kind": "grid", "model": model, "grid": {**grid, "y": "seed"}})
    assert "grid.prompts[0]" in problems({"version": 1, "kind": "grid", "model": model,
                                          "grid": {**grid, "prompts": ["a cat --w 30"]}})
    train = {"version": 1, "model": model, "dataset": {"uri": "s3://d/x"}}
    assert "sample.grid" in problems({**train, "sample": {"grid": {}}})  # no prompts
    assert "sample.grid" in problems({**train, "sample": {"prompts": ["a"], "grid": {"x": "weight", "y": "seed",
                                                                                      "seeds": [1]}}})
    assert "grid" in problems({**train, "grid": grid})


def test_openapi_describes_the_grid_kind_and_the_rendering_phase(client_factory):
    doc = client_factory(launcher="none", reconcile_interval_s=0).get("/schema/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"GridSpec", "GridAdapterSpec", "GridAxesSpec"} <= set(schemas)
    assert "'grid'" in str(doc) and "'rendering'" in str(doc)
    assert set(schemas["GridSpec"]["properties"]) >= {"adapters", "prompts", "x", "y", "weights", "seeds", "sampler"}


def test_the_stored_expanded_grid_spec_decodes_again():
    """The service stores each job entry expanded into its saves with both job and uri; the reconciler
    decodes that spec to launch the job, so the check must take it back."""
    from trainer.core.spec import decode_spec, encode_spec, spec_from_obj

    job = "j-20250101t120000-0123abcd"
    expanded = {"version": 1, "kind": "grid", "model": {"uri": "s3://m/base"},
                "grid": {"adapters": [{"job": job, "uri": "s3://o/run-000001.safetensors", "label": "run-000001"},
                                      {"job": job, "uri": "s3://o/run.safetensors", "label": "run"}],
                         "prompts": ["a cat"]}}
    spec = spec_from_obj(expanded)
    again = decode_spec(encode_spec(spec), format="json")
    assert [(a.job, a.uri) for a in again.grid.adapters] == [(a.job, a.uri) for a in spec.grid.adapters]
