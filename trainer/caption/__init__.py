"""Dataset captioning with models: WD14-format ONNX taggers and sentence captioners, writing a new dataset version."""
