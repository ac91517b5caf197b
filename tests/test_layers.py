"""The layer contract: imports run one way only.

    core (adalora_deploy/: config, layers, model, allocator, training, data, prune, ...)
      <- exporters (adalora_deploy.exporters)
      <- runtime (adalora_deploy.runtime: sessions, predictor, server)
    top: the CLI (cli.py, __main__.py, commands/), demo.py and bench/ may import every stage.

Every import statement is read from the source (module level and inside functions alike), so an
import that runs the wrong way fails here even when no test executes it. The serving path is also
imported and run for real in a fresh interpreter, which must never load torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"adalora_deploy": ROOT / "adalora_deploy", "adalora_deploy.exporters": ROOT / "exporters",
                "adalora_deploy.runtime": ROOT / "runtime"}
TOP = ("adalora_deploy.cli", "adalora_deploy.__main__", "adalora_deploy.commands", "adalora_deploy.demo",
       "adalora_deploy.bench")
EXPORTERS, RUNTIME = "adalora_deploy.exporters", "adalora_deploy.runtime"
# What the serving path may import besides the standard library and itself.
SERVING_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "fastapi", "uvicorn", "pydantic", "starlette"}
SERVING_CORE = {"adalora_deploy", "adalora_deploy.config", "adalora_deploy.constants", "adalora_deploy.errors",
                "adalora_deploy.io", "adalora_deploy.ort"}
# The one ONNX Runtime helper, imported by the exporters, the serving path and the benchmarks alike.
ORT_HELPER = "adalora_deploy.ort"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer(module: str) -> str:
    if any(_within(module, t) for t in TOP):
        return "top"
    if _within(module, EXPORTERS):
        return "exporters"
    if _within(module, RUNTIME):
        return "runtime"
    return "core"


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name (exporters/ and runtime/ mapped)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "adalora_deploy" and parts and parts[0] in ("exporters", "runtime"):
                continue  # not in the source tree; guard against a stray folder
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports pkg.sub when sub is a module: count both spellings
            names += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return names


def violations(rule) -> list[str]:
    known = modules()
    found = []
    for module, path in known.items():
        for line, name in imports(module, path):
            if name.startswith("adalora_deploy") and name not in known and name.rpartition(".")[0] in known:
                continue  # `from adalora_deploy.x import some_function`: the module line is checked
            reason = rule(module, name)
            if reason:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}: {reason}")
    return sorted(set(found))


def core_rule(module: str, name: str) -> str | None:
    if layer(module) != "core" or not name.startswith("adalora_deploy"):
        return None
    target = layer(name)
    return f"core must not import {target}" if target != "core" else None


def exporters_rule(module: str, name: str) -> str | None:
    if layer(module) == "exporters" and layer(name) in ("runtime", "top") and name.startswith("adalora_deploy"):
        return f"exporters must not import {layer(name)}"
    return None


def serving_rule(module: str, name: str) -> str | None:
    if layer(module) != "runtime":
        return None
    top = name.split(".")[0]
    if top == "adalora_deploy":
        if layer(name) == "runtime" or name in SERVING_CORE:
            return None
        return "the serving path imports only the torch-free core (config, constants, errors, io)"
    if top in sys.stdlib_module_names or top in SERVING_THIRD_PARTY or top == "__future__":
        return None
    return "the serving path needs only onnxruntime, tokenizers, numpy, fastapi and uvicorn"


def ort_helper_rule(module: str, name: str) -> str | None:
    if module != ORT_HELPER:
        return None
    top = name.split(".")[0]
    if name in ("adalora_deploy.constants", "adalora_deploy.errors") or top in ("numpy", "onnxruntime", "__future__"):
        return None
    if top != "adalora_deploy" and top in sys.stdlib_module_names:
        return None
    return "the ONNX Runtime helper imports only numpy, onnxruntime, constants and errors"


@pytest.mark.parametrize("rule", [core_rule, exporters_rule, serving_rule, ort_helper_rule],
                         ids=["core", "exporters", "serving", "ort-helper"])
def test_imports_run_one_way(rule):
    assert violations(rule) == []


def test_the_contract_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The scanner itself: a function-level import of torch in runtime and of the exporters in core fail."""
    (tmp_path / "runtime").mkdir()
    (tmp_path / "core").mkdir()
    bad_runtime = tmp_path / "runtime" / "session.py"
    bad_runtime.write_text("def f():\n    import torch\n    from transformers import AutoTokenizer\n")
    bad_core = tmp_path / "core" / "model.py"
    bad_core.write_text("def g():\n    from .exporters import export\n    from .runtime.session import x\n")
    bad_helper = tmp_path / "core" / "ort.py"
    bad_helper.write_text("import onnxruntime\ndef h():\n    import torch\n    from .model import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS",
                        {"adalora_deploy": tmp_path / "core", "adalora_deploy.runtime": tmp_path / "runtime"})
    assert {v.split(" imports ")[1].split(":")[0] for v in violations(serving_rule)} == {
        "torch", "transformers", "transformers.AutoTokenizer"}
    assert {v.split(" imports ")[1].split(":")[0] for v in violations(core_rule)} >= {
        "adalora_deploy.exporters", "adalora_deploy.runtime.session"}
    assert {v.split(" imports ")[1].split(":")[0] for v in violations(ort_helper_rule)} == {
        "torch", "adalora_deploy.model"}


# Calls that open or probe ONNX Runtime sessions; only the helper makes them (tests may, as references).
SESSION_CALLS = ("InferenceSession(", "get_available_providers(")


def test_sessions_are_opened_by_the_one_helper():
    """adalora_deploy.ort is the only code that opens an InferenceSession or lists providers: exporters,
    serving and benchmarks go through it, so the CUDA check and the CPU session rules cannot diverge."""
    helper = ROOT / "adalora_deploy" / "ort.py"
    sources = [p for d in ("adalora_deploy", "exporters", "runtime", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert helper in sources and all(call in helper.read_text() for call in SESSION_CALLS)
    found = [f"{p.relative_to(ROOT)}: {call}" for p in sources if p != helper for call in SESSION_CALLS
             if call in p.read_text()]
    assert found == []


SERVE_WITHOUT_TORCH = """
import sys, threading, time, json, urllib.request
import adalora_deploy.runtime
from adalora_deploy.runtime import Predictor
from adalora_deploy.runtime.server import ServerConfig, create_app
import uvicorn

predictor = Predictor.from_pretrained(sys.argv[1], mode="merged", provider="cpu")
labels = predictor(["a gripping film", ("premise", "hypothesis")]).labels
assert len(labels) == 2, labels
app = create_app(Predictor.from_pretrained(sys.argv[1], mode="factored", provider="cpu"), ServerConfig())
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.05)
port = server.servers[0].sockets[0].getsockname()[1]
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=json.dumps({"inputs": ["fine"]}).encode(),
                                 headers={"content-type": "application/json"})
body = json.loads(urllib.request.urlopen(request, timeout=60).read())
server.should_exit = True
thread.join(timeout=30)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum", "onnx")
                or m.startswith("adalora_deploy.exporters") or m.startswith("adalora_deploy.bench"))
print(json.dumps({"loaded": loaded, "predictions": len(body["predictions"])}))
"""


def test_serving_runs_without_loading_torch(tiny_export_root):
    """Predictor and server, in a fresh interpreter: one prediction and one real HTTP request, and
    neither torch, transformers, optimum, onnx nor the exporters is ever imported."""
    import json

    out = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(tiny_export_root)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"loaded": [], "predictions": 1}


def test_the_cuda_probe_model_is_the_one_onnx_builds():
    """ort.PROBE_MODEL is written out as bytes so that serving needs no `onnx`: the same model."""
    from onnx import TensorProto, helper

    from adalora_deploy.ort import PROBE_MODEL

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert model.SerializeToString() == PROBE_MODEL
