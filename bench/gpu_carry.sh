#!/usr/bin/env bash
# Prepares .gpu_carry/: the few sglang files our Triton backend needs, so bench/gpu_check.py runs on a GPU host that
# has torch + triton but no sglang (the device machine). Run it here, then carry ".gpu_carry" and put it on the
# GPU host's PYTHONPATH:
#
#     bash bench/gpu_carry.sh                     # writes .gpu_carry/ (a few hundred KB), prints what it copied
#     PYTHONPATH=.gpu_carry python3 bench/gpu_check.py --out "$OUT"
#
# What it copies: sglang.kernels.ops.attention.extend_attention and every sglang.kernels.* module it imports at
# module level (decode_attention for _extract_kv_strides, score_mod), found by reading their imports (ast), verbatim
# from the venv's sglang. What it stubs: the non-kernel modules those files import (sglang.srt.environ's ``envs`` and
# sglang.srt.utils' device checks), with the values sglang computes itself (env defaults read from the venv's
# sglang.srt.environ; is_cuda/is_hip/... as in sglang.srt.utils.common). Every package __init__ is empty, so nothing
# else of sglang is imported. An import it does not know how to stub is an error, not a silent gap.
#
# FlashInfer is not carried: flashinfer-python 0.7.2 is one 65 MB py3-none-any wheel (plus apache-tvm-ffi), more than
# the 64 MiB a run may carry; bench/gpu_check.py skips its flashinfer part when the module is not importable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${1:-$ROOT/.gpu_carry}"

"$PY" - "$DEST" <<'EOF'
import ast
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

dest = Path(sys.argv[1])
spec = importlib.util.find_spec("sglang")
assert spec is not None and spec.origin, "sglang is not importable by this python: run with the project's venv"
src_root = Path(spec.origin).parent  # .../site-packages/sglang
version = "unknown"
try:
    from importlib.metadata import version as _v

    version = _v("sglang")
except Exception:
    pass

ENTRY = "sglang.kernels.ops.attention.extend_attention"
STUBBED = {"sglang.srt.environ", "sglang.srt.utils"}


def module_file(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    for cand in (src_root / rel.with_suffix(".py"), src_root / rel / "__init__.py"):
        if cand.is_file():
            return cand
    raise SystemExit(f"gpu_carry: cannot find {name} under {src_root}")


def toplevel_imports(path: Path):
    """(module, [names]) of the sglang imports executed at import time (not inside functions)."""
    out = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang"):
                out.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("sglang"):
                        out.append((a.name, []))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, [])
                    for s in sub:
                        visit(s.body if isinstance(s, ast.ExceptHandler) else [s])

    visit(ast.parse(path.read_text()).body)
    return out


copied, stub_names = {}, {m: set() for m in STUBBED}
todo = [ENTRY]
while todo:
    name = todo.pop()
    if name in copied:
        continue
    path = module_file(name)
    copied[name] = path
    for mod, names in toplevel_imports(path):
        if mod in STUBBED:
            stub_names[mod].update(names)
        elif mod.startswith("sglang.kernels."):
            todo.append(mod)
        else:
            raise SystemExit(f"gpu_carry: {name} imports {mod} ({names}); teach bench/gpu_carry.sh to stub it")

# env fields used by the copied files: their type and default, from the real sglang.srt.environ
import re

used_envs = sorted({m for p in copied.values() for m in re.findall(r"\benvs\.(\w+)", p.read_text())})
from sglang.srt.environ import envs as real_envs  # noqa: E402

env_table = {}
for field in used_envs:
    f = getattr(type(real_envs), field, None)
    f = getattr(real_envs, field) if f is None else f
    kind = type(f).__name__
    kind = "bool" if "Bool" in kind else "int" if "Int" in kind else "float" if "Float" in kind else "str"
    env_table[field] = (kind, f.default)

UTILS = {
    "is_cuda": "def is_cuda():\n    return torch.cuda.is_available() and torch.version.cuda is not None\n",
    "is_hip": "def is_hip():\n    return torch.version.hip is not None\n",
    "is_gfx95_supported": "def is_gfx95_supported():\n    return bool(torch.version.hip) and 'gfx95' in "
                          "torch.cuda.get_device_properties(0).gcnArchName\n",
    "is_gfx1250_supported": "def is_gfx1250_supported():\n    return bool(torch.version.hip) and 'gfx1250' in "
                            "torch.cuda.get_device_properties(0).gcnArchName\n",
    "get_device_core_count": "def get_device_core_count(device_id=0):\n    if torch.cuda.is_available():\n"
                             "        return torch.cuda.get_device_properties(device_id).multi_processor_count\n"
                             "    return 0\n",
}
missing = stub_names["sglang.srt.utils"] - UTILS.keys()
if missing:
    raise SystemExit(f"gpu_carry: the kernels import sglang.srt.utils.{sorted(missing)}: add them to UTILS")
if stub_names["sglang.srt.environ"] - {"envs"}:
    raise SystemExit(f"gpu_carry: unexpected sglang.srt.environ imports {stub_names['sglang.srt.environ']}")

if dest.exists():
    shutil.rmtree(dest)
pkg = dest / "sglang"
for name, path in copied.items():
    target = pkg / Path(*name.split(".")[1:]).with_suffix(".py")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
(pkg / "srt").mkdir(parents=True, exist_ok=True)
HEADER = f'"""Stub written by bench/gpu_carry.sh (from sglang {version}): only what the carried kernels use."""\n\n'
(pkg / "srt" / "environ.py").write_text(HEADER + f'''import os

_TABLE = {env_table!r}  # name -> (type, sglang's default)


class _Env:
    def __init__(self, name, kind, default):
        self.name, self.kind, self.default = name, kind, default

    def get(self):
        raw = os.getenv(self.name)
        if raw is None:
            return self.default
        if self.kind == "bool":
            return raw.lower() in ("true", "1", "yes", "y")
        return {{"int": int, "float": float}}.get(self.kind, str)(raw)


class _Envs:
    def __getattr__(self, name):
        if name not in _TABLE:
            raise AttributeError(f"sglang.srt.environ stub: {{name}} was not carried (rerun bench/gpu_carry.sh)")
        return _Env(name, *_TABLE[name])


envs = _Envs()
''')
(pkg / "srt" / "utils.py").write_text(HEADER + "import torch\n\n\n" + "\n\n".join(
    UTILS[n] for n in sorted(stub_names["sglang.srt.utils"])))
for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
    init = d / "__init__.py"
    if not init.exists():
        init.write_text("")
(pkg / "__init__.py").write_text(f"# carried by bench/gpu_carry.sh from sglang {version}: kernels only\n"
                                 f"CARRIED_FROM = {version!r}\n")
lines = [f"sglang {version} from {src_root}"]
for name, path in sorted(copied.items()):
    lines.append(f"copied {name}  sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}")
lines.append(f"stubbed sglang.srt.utils: {', '.join(sorted(stub_names['sglang.srt.utils']))}")
lines.append(f"stubbed sglang.srt.environ.envs: {', '.join(f'{k}={v[1]!r}' for k, v in env_table.items())}")
(dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

du -sh "$DEST" | sed 's/^/gpu_carry size: /'
