"""mlora.device: current_on enters no device switch where the device is current already."""

import contextlib

import torch

from mlora import device


def test_current_on_switches_only_to_another_cuda_device(monkeypatch):
    # (no GPU needed: the current index is the only thing read, and a torch.cuda.device is
    # only constructed, never entered)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(device.current_on(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device.current_on(torch.device("cuda")), contextlib.nullcontext)  # (the current one)
    assert isinstance(device.current_on(torch.device("cuda", 0)), contextlib.nullcontext)
    other = device.current_on(torch.device("cuda", 1))
    assert isinstance(other, torch.cuda.device) and other.idx == 1
