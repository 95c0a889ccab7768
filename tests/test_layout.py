"""The checkout's top-level kernels/ folder (moelora.kernels once installed) must not shadow the Hugging Face
`kernels` package when the repository root is on sys.path (`python -m bench`, pytest from a checkout):
transformers >= 5.25 imports that package as soon as it finds one."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with the repository root first on sys.path, as `python -m` from it has."""
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


TOP_LEVEL_KERNELS = "import kernels; print(kernels.__file__)"
TRANSFORMERS_ACTIVATIONS = "from transformers.activations import ACT2FN; print(type(ACT2FN['silu']).__name__)"
MOELORA_KERNELS = "import moelora.kernels.route as r; print(r.__file__)"


def test_top_level_kernels_is_the_hub_package_where_installed():
    proc = _run(TOP_LEVEL_KERNELS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = Path(proc.stdout.strip()).resolve() == ROOT / "kernels" / "__init__.py"
    assert ours != _hub_kernels_installed(), proc.stdout  # the Hugging Face package where it is installed


def test_transformers_imports_with_the_root_on_sys_path():
    proc = _run(TRANSFORMERS_ACTIVATIONS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "SiLUActivation"


def test_moelora_kernels_is_this_folder():
    proc = _run(MOELORA_KERNELS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve() == ROOT / "kernels" / "route.py"
