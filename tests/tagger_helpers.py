"""The tiny WD14-format tagger several test folders build: an ONNX graph with the real signature
(NHWC float input, one sigmoid score per row) plus its selected_tags.csv. Imported as
`tests.tagger_helpers`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

SIZE = 32
# category 9 rating, 0 general, 4 character (the WD14 CSV's codes)
ROWS = [("general", "9"), ("sensitive", "9"), ("questionable", "9"), ("explicit", "9"),
        ("1girl", "0"), ("red_hair", "0"), ("long_hair", "0"), ("sword", "0"), ("^_^", "0"), ("smile", "0"),
        ("blue_sky", "0"), ("outdoors", "0"), ("hero_(series)", "4"), ("villain_(other_series)", "4")]


def build_tagger(folder: Path, *, size: int = SIZE, channels: int = 3, rows=ROWS, batch: int | str = "N",
                 seed: int = 0) -> Path:
    """Mean colour per channel → dense → sigmoid: scores that differ between images and spread
    over (0, 1), so thresholds cut somewhere in the middle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, (channels, len(rows))).astype(np.float32)
    bias = rng.normal(0, 2.0, len(rows)).astype(np.float32)
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, channels])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(rows)])
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Sub", ["mean", "centre"], ["centred"]),
        helper.make_node("MatMul", ["centred", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel()),
             helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
             helper.make_tensor("centre", TensorProto.FLOAT, [channels], [128.0] * channels)]
    graph = helper.make_graph(nodes, "tiny_wd14", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(rows):
            out.writerow([i, name, category, 100])
    return folder
