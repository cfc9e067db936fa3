import radgrad


def test_public_names_are_pinned():
    assert sorted(radgrad.__all__) == [
        "BITS", "Coverage", "METHODS", "Sketch", "SketchConfig", "allocate", "convert", "coverage", "draw", "functional", "memory", "models", "nn",
        "pack", "save_for_backward", "saved_tensors", "tie", "unpack",
    ]
    assert radgrad.nn.__all__ == ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                                  "ConvTranspose3d", "ReLU", "PReLU", "AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool1d", "MaxPool2d",
                                  "MaxPool3d", "RNN", "LSTM", "GRU", "LayerNorm", "RMSNorm", "Dropout", "Activation", "RMSNormLike",
                                  "TransposedLinear"]
    assert sorted(radgrad.functional.__all__) == sorted([
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "conv", "conv_transpose", "dropout", "elementwise", "layer_norm", "linear",
        "max_pool1d", "max_pool2d", "max_pool3d",
        "recurrence", "lstm_recurrence", "gru_recurrence", "relu", "prelu", "scaled_dot_product_attention", "batch_norm", "group_norm", "instance_norm",
        "multi_head_attention_forward",
        "baddbmm", "einsum", "matmul", "mul", "rms_norm", "softmax", "log_softmax", "cross_entropy"])
    assert sorted(radgrad.METHODS) == ["norm", "project", "quantize", "sample"]
    assert radgrad.BITS == (1, 2, 4, 8)


def test_the_core_needs_torch_alone():
    # numpy, tqdm, matplotlib and pillow belong to radgrad[experiments]
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('numpy', 'tqdm', 'matplotlib', 'PIL'): sys.modules[name] = None\n"
            "import torch, radgrad\n"
            "model = radgrad.convert(radgrad.models.cifar_convnet(), keep=0.1)\n"
            "model(torch.rand(2, 3, 32, 32)).sum().backward()\n")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
