"""The vLLM integration's tests run in the vLLM environment (`bash scripts/test_vllm.sh`, which
makes it when missing and builds minlora for it); the main environment's pytest skips them.

There the minlora package must be the one built for that environment (its torch differs from
the main environment's): scripts/vllm_env.sh puts it on PYTHONPATH, and Python must not put
the checkout first (run with -P, as test_vllm.sh does).  Each test module starts with
`pytest.importorskip("vllm", reason=vllm_assets.NEEDS_VLLM)`.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
IN_VLLM_ENV = importlib.util.find_spec("vllm") is not None


def pytest_configure(config):
    if not IN_VLLM_ENV:
        return
    import minlora

    built_in_checkout = os.path.dirname(os.path.abspath(minlora.__file__)) == os.path.join(CHECKOUT, "minlora")
    if built_in_checkout:
        raise pytest.UsageError(
            "the vLLM tests imported the checkout's minlora (built for the main environment's torch); "
            "run them with bash scripts/test_vllm.sh"
        )


@pytest.fixture(scope="session")
def assets_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-assets")


@pytest.fixture(scope="session")
def llama_assets(assets_root):
    from vllm_assets import write_assets

    return write_assets(str(assets_root / "llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_assets(assets_root):
    from vllm_assets import write_assets

    return write_assets(str(assets_root / "qwen2"), "qwen2")
