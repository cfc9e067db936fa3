import radgrad


def test_public_names_are_pinned():
    assert sorted(radgrad.__all__) == [
        "METHODS", "Sketch", "SketchConfig", "convert", "draw", "functional", "memory", "models", "nn",
        "pack", "save_for_backward", "saved_tensors", "tie", "unpack",
    ]
    assert radgrad.nn.__all__ == ["Linear", "Conv1d", "Conv2d", "ReLU", "AvgPool1d", "AvgPool2d", "MaxPool2d", "RNN"]
    assert sorted(radgrad.METHODS) == ["project", "sample"]
