"""The allocator setting is asked for before CUDA initialises, and never over the user's own."""

from __future__ import annotations

import os

import pytest

from sam3stream.runtime import allocator

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def private_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the environment for each test, so that what the code under test sets is dropped."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != allocator.SETTING})


def test_cuda_device_asks_for_expandable_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.prefer_expandable_segments("cuda:0") is True
    assert os.environ[allocator.SETTING] == allocator.EXPANDABLE


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    os.environ[allocator.SETTING] = "max_split_size_mb:128"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.prefer_expandable_segments("cuda") is False
    assert os.environ[allocator.SETTING] == "max_split_size_mb:128"


def test_too_late_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert allocator.prefer_expandable_segments("cuda") is False
    assert allocator.SETTING not in os.environ


def test_cpu_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator.prefer_expandable_segments("cpu") is False
    assert allocator.SETTING not in os.environ
