"""Intel XPU: TRITON covers it where Triton has Intel's XPU backend; the native XPU kernel stays declared.

No XPU here: named devices drive the oracle, and the backend detection runs on a fake triton package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wna16moe.config import MoEConfig
from wna16moe.device import TRITON_XPU_PROVIDER, DeviceInfo, Platform, has_triton_xpu_backend
from wna16moe.experts.triton import TritonExperts
from wna16moe.oracle import BACKEND_ENV, PRIORITY, Backend, Verdict, explain

TINY = MoEConfig(8, 2, 256, 128)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def _verdicts(device: DeviceInfo, scheme: str = "int4_g32_sym") -> dict[Backend, tuple[Verdict, str]]:
    report = explain(TINY, scheme, device=device)
    return {c.backend: (c.verdict, c.reason) for c in report.candidates}


def test_xpu_row_order() -> None:
    row = PRIORITY["xpu"]
    assert row[0] == Backend.XPU and row[-1] == Backend.EMULATION
    assert row.index(Backend.TRITON) < row.index(Backend.EMULATION)


def test_triton_runs_an_xpu_with_intels_triton_backend() -> None:
    verdicts = _verdicts(DeviceInfo.named("xpu"))
    assert verdicts[Backend.TRITON][0] == Verdict.CHOSEN
    assert verdicts[Backend.XPU] == (Verdict.REJECTED, "implemented: not implemented in this version")
    # Where the native kernel's own checks fail too, it says so beside "not implemented".
    zp = _verdicts(DeviceInfo.named("xpu"), "int4_g128_zp")
    assert zp[Backend.TRITON][0] == Verdict.CHOSEN
    assert "scheme: zero points are not supported" in zp[Backend.XPU][1]


def test_xpu_without_intels_triton_backend_falls_back_to_emulation() -> None:
    plain_triton = DeviceInfo(Platform.XPU, "Intel Data Center GPU Max 1550", packages=frozenset({"triton"}))
    verdicts = _verdicts(plain_triton)
    assert verdicts[Backend.TRITON] == (Verdict.REJECTED, "device: the installed Triton has no Intel XPU backend "
                                                          "(triton.backends.intel, from Intel's Triton build)")
    assert verdicts[Backend.EMULATION][0] == Verdict.CHOSEN


def test_the_intel_backend_is_only_an_xpu_requirement() -> None:
    for name in ("h100-bare", "mi300x"):
        device = DeviceInfo.named(name)
        with_triton = DeviceInfo(device.platform, device.name, device.compute_capability,
                                 packages=frozenset({"triton"}))
        assert TritonExperts.supports_device(with_triton).ok


@pytest.mark.parametrize("backends", [("nvidia", "amd"), ("nvidia", "intel")])
def test_backend_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backends: tuple[str, ...]) -> None:
    package = tmp_path / "triton"
    for backend in backends:
        (package / "backends" / backend).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "triton", raising=False)  # find_spec would return the imported one
    monkeypatch.syspath_prepend(str(tmp_path))
    assert has_triton_xpu_backend() == ("intel" in backends)


def test_named_xpu_has_the_backend() -> None:
    assert DeviceInfo.named("xpu").has_package(TRITON_XPU_PROVIDER)
    assert not DeviceInfo.named("xpu-bare").has_package(TRITON_XPU_PROVIDER)
