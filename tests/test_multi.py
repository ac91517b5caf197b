"""Many adapters on one multi graph: packs, mixed-adapter batches against each adapter's own merged export,
per-module rank stacking, refusals that leave the loaded adapters serving, and CUDA residency."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adalora_deploy.constants import (
    ADAPTER_MANIFEST_FILE,
    ADAPTER_PACK_FILE,
    DOWN_SUFFIX,
    HEAD_WEIGHT_INPUT,
    MANIFEST_FILE,
    UP_SUFFIX,
)
from adalora_deploy.exporters import export
from adalora_deploy.runtime.adapters import (
    AdapterPackError,
    AdapterRegistry,
    UnknownAdapterError,
    read_pack,
    stack,
)
from adalora_deploy.runtime.predictor import Predictor

from .conftest import minilm_tokenizer, save_tiny_bert, train_peft_adalora

pytestmark = pytest.mark.slow
TEXTS = ["a quietly devastating film", "dull", "the plot never comes together, and the cast knows it",
         "sharp, funny and humane", "one of the year's best", "i wanted my two hours back", "a delight"]
LABELS3 = {0: "negative", 1: "neutral", 2: "positive"}


def make_adapter(path: Path, base_dir: Path, num_labels: int, seed: int, rank_zero: int = 0, **cfg):
    """A checkpoint with random non-zero lam; the first `rank_zero` modules are pruned to rank 0."""
    from adalora_deploy.config import AdaLoraConfig
    from adalora_deploy.model import prepare_model

    id2label = LABELS3 if num_labels == 3 else {0: "rotten", 1: "fresh"}
    model = prepare_model(str(base_dir), AdaLoraConfig(**{"init_r": 4, "target_r": 2, "alpha": 8.0, **cfg}),
                          num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(model.adapters.values()):
            m.lam.normal_(0.0, 0.5)
            m.mask.zero_()
            m.mask[torch.randperm(m.r)[: 0 if i < rank_zero else 1 + (i + seed) % m.r]] = True
            m.lam.mul_(m.mask)
        model.model.classifier.weight.normal_(0.0, 0.5)
    model.eval().save_pretrained(path, tokenizer=minilm_tokenizer(), steps_done=10)
    return path


def peft_adapter(path: Path, base_dir: Path) -> Path:
    """A PEFT AdaLoRA classifier trained a few steps with update_and_allocate (uneven ranks), saved."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, lora_alpha=8, total_step=10, tinit=2,
                           tfinal=3, deltaT=1, target_modules=["key", "intermediate.dense"])
    model = get_peft_model(base, config)
    x, y = torch.randint(1000, 2000, (8, 12)), torch.randint(0, 2, (8,))
    return train_peft_adalora(model, 10, lambda m: m(input_ids=x, labels=y).loss, path, lr=2e-2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base, multi graph, and four adapters (pack + own merged export each)."""
    root = tmp_path_factory.mktemp("multi")
    base = save_tiny_bert(root / "base")
    sources = {
        "rank0": make_adapter(root / "ck-rank0", base, 2, seed=1, rank_zero=5),  # default targets, 5 at rank 0
        "qv3": make_adapter(root / "ck-qv3", base, 3, seed=2, target_modules=["query", "value"]),
        "ffn3": make_adapter(root / "ck-ffn3", base, 3, seed=4, target_modules=["intermediate.dense"]),
        "peft": peft_adapter(root / "peft", base),
    }
    packs, merged = {}, {}
    for name, src in sources.items():
        packs[name] = export(src, root / f"pack-{name}", mode="adapter", prune_ranks=True)
        merged[name] = export(src, root / f"onnx-{name}", mode="merged", prune_ranks=True) / "merged"
    multi = export(base, root / "onnx-multi", mode="multi")
    return {"root": root, "base": base, "sources": sources, "packs": packs, "merged": merged, "multi": multi}


@pytest.fixture(scope="module")
def predictor(setup):
    p = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cpu")
    for name, pack in setup["packs"].items():
        p.load_adapter(name, pack)
    return p


def _own_logits(setup, texts) -> dict[str, np.ndarray]:
    """Each adapter's logits from its own merged export (rows of TEXTS, computed once per module)."""
    if "own" not in setup:
        setup["own"] = {n: Predictor.from_pretrained(d, provider="cpu").predict(TEXTS).logits
                        for n, d in setup["merged"].items()}
    return {n: v[[TEXTS.index(t) for t in texts]] for n, v in setup["own"].items()}


def test_pack_holds_factors_at_their_own_ranks_and_never_the_base(setup):
    manifest = json.loads((setup["packs"]["rank0"] / ADAPTER_MANIFEST_FILE).read_text())
    ranks = manifest["ranks"]
    assert sum(r == 0 for r in ranks.values()) >= 5 and max(ranks.values()) >= 2
    assert manifest["head"]["num_labels"] == 2 and manifest["id2label"] == {"0": "rotten", "1": "fresh"}
    assert manifest["source"]["kind"] == "adalora-deploy-checkpoint" and len(manifest["base"]["sha256"]) == 64
    from safetensors.numpy import load_file

    tensors = load_file(str(setup["packs"]["rank0"] / ADAPTER_PACK_FILE))
    for module, r in ranks.items():
        assert (module + DOWN_SUFFIX in tensors) == (r > 0)
        if r:
            assert tensors[module + DOWN_SUFFIX].shape[1] == r
    base_bytes = sum(f.stat().st_size for f in setup["base"].glob("*.safetensors"))
    assert (setup["packs"]["rank0"] / ADAPTER_PACK_FILE).stat().st_size < base_bytes / 20
    peft = json.loads((setup["packs"]["peft"] / ADAPTER_MANIFEST_FILE).read_text())
    assert peft["source"]["kind"] == "peft-adalora" and peft["base"]["sha256"] == manifest["base"]["sha256"]


def test_mixed_batch_rows_match_each_adapters_merged_export(setup, predictor):
    names = list(setup["packs"])
    rows = [(t, names[(i + j) % len(names)]) for i, t in enumerate(TEXTS) for j in range(2)]
    got = predictor.predict([t for t, _ in rows], adapter=[a for _, a in rows])
    own = _own_logits(setup, TEXTS)
    width = {n: own[n].shape[1] for n in names}
    assert sorted(set(width.values())) == [2, 3]
    for k, (text, name) in enumerate(rows):
        want = own[name][TEXTS.index(text)]
        np.testing.assert_allclose(got.logits[k, : width[name]], want, atol=1e-4)
        assert np.all(np.isneginf(got.logits[k, width[name]:]))
        record = got.records()[k]
        assert record["adapter"] == name and len(record["scores"]) == width[name]


def test_each_module_is_stacked_at_its_own_largest_loaded_rank(setup, predictor):
    state = predictor.adapters.state
    ranks = {n: json.loads((p / ADAPTER_MANIFEST_FILE).read_text())["ranks"] for n, p in setup["packs"].items()}
    for module in predictor.adapters.graph["modules"]:
        want = max(r.get(module, 0) for r in ranks.values())
        assert state.feeds[module + DOWN_SUFFIX].shape == (4, predictor.adapters.graph["modules"][module]["d_in"], want)
    assert state.feeds["bert.pooler.dense" + DOWN_SUFFIX].shape[2] == 0  # no adapter touches it: an empty branch
    assert state.feeds[HEAD_WEIGHT_INPUT].shape[:2] == (4, 3)


def test_refusals_leave_the_loaded_adapters_serving(setup, predictor, tmp_path):
    before = predictor.predict(TEXTS, adapter="qv3").logits
    other_base = save_tiny_bert(tmp_path / "other-base", seed=7)
    other = export(make_adapter(tmp_path / "ck-other", other_base, 2, seed=1), tmp_path / "pack-other",
                   mode="adapter", prune_ranks=True)
    with pytest.raises(AdapterPackError, match="another base model"):
        predictor.load_adapter("other", other)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(setup["packs"]["qv3"], corrupt)
    data = (corrupt / ADAPTER_PACK_FILE).read_bytes()
    (corrupt / ADAPTER_PACK_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterPackError, match="corrupt or truncated"):
        predictor.load_adapter("qv3", corrupt)
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        predictor.predict(TEXTS, adapter="nope")
    with pytest.raises(UnknownAdapterError):
        predictor.unload_adapter("nope")
    assert [a["name"] for a in predictor.list_adapters()] == list(setup["packs"])
    np.testing.assert_array_equal(predictor.predict(TEXTS, adapter="qv3").logits, before)


def test_unload_and_reload_change_only_that_adapter(setup, predictor):
    own = _own_logits(setup, TEXTS[:3])
    predictor.unload_adapter("ffn3")
    with pytest.raises(UnknownAdapterError):
        predictor.predict(TEXTS[:3], adapter="ffn3")
    np.testing.assert_allclose(predictor.predict(TEXTS[:3], adapter="rank0").logits, own["rank0"], atol=1e-4)
    predictor.load_adapter("ffn3", setup["packs"]["ffn3"])
    np.testing.assert_allclose(predictor.predict(TEXTS[:3], adapter="ffn3").logits, own["ffn3"], atol=1e-4)


def test_host_stacks_are_the_only_copy_and_restack_exactly_after_an_unload(setup):
    # the packs keep views into the stacks (no second copy of the factors); an unload restacks from those
    # views, and must give exactly the stacks of freshly read packs
    graph = json.loads((setup["multi"] / "multi" / MANIFEST_FILE).read_text())
    registry = AdapterRegistry(graph)
    for name, pack in setup["packs"].items():
        registry.load(name, pack)
    registry.unload("qv3")
    state = registry.state
    fresh = stack(tuple(read_pack(n, setup["packs"][n], graph) for n in ("rank0", "ffn3", "peft")), graph)
    assert [p.name for p in state.packs] == ["rank0", "ffn3", "peft"] and set(state.feeds) == set(fresh)
    for key, array in fresh.items():
        np.testing.assert_array_equal(state.feeds[key], array)
    for i, pack in enumerate(state.packs):
        for module, (down, up) in pack.factors.items():
            assert np.shares_memory(down, state.feeds[module + DOWN_SUFFIX])
            assert np.shares_memory(up, state.feeds[module + UP_SUFFIX])
            r = down.shape[1]
            np.testing.assert_array_equal(state.feeds[module + DOWN_SUFFIX][i, :, r:], 0)  # padding stays zero


def test_cli_refuses_a_pack_without_prune_ranks(setup, tmp_path):
    out = tmp_path / "pack"
    result = subprocess.run([sys.executable, "-m", "adalora_deploy", "export", str(setup["sources"]["rank0"]),
                             "--mode", "adapter", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and "add --prune-ranks" in result.stderr and not out.exists()


@pytest.mark.gpu
def test_cuda_keeps_the_stacks_on_the_device_and_the_session(setup):
    cpu = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cpu")
    gpu = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cuda")
    cpu.load_adapter("rank0", setup["packs"]["rank0"])
    gpu.load_adapter("rank0", setup["packs"]["rank0"])
    session = gpu.session.session
    first = gpu.predict(TEXTS, adapter="rank0").logits
    for name in ("qv3", "peft"):
        cpu.load_adapter(name, setup["packs"][name])
        gpu.load_adapter(name, setup["packs"][name])
    assert gpu.session.session is session  # loading never re-creates the session
    feeds = gpu.adapters.state.feeds
    assert all(v.device_name().lower() == "cuda" for v in feeds.values())
    names = ["rank0", "qv3", "peft"] * 3
    got = gpu.predict(TEXTS[:len(names)] + TEXTS[:2], adapter=names + ["qv3", "peft"]).logits
    want = cpu.predict(TEXTS[:len(names)] + TEXTS[:2], adapter=names + ["qv3", "peft"]).logits
    np.testing.assert_allclose(got, want, atol=1e-3)
    np.testing.assert_allclose(gpu.predict(TEXTS, adapter="rank0").logits, first, atol=1e-5)


# -- over real HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(setup):
    """A server on the multi graph with rank0 and qv3 loaded and hot loading on under the setup's root."""
    from adalora_deploy.runtime.server import ServerConfig, create_app

    from .test_server import free_port, serving

    p = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cpu", batch_size=16)
    for name in ("rank0", "qv3"):
        p.load_adapter(name, setup["packs"][name])
    config = ServerConfig(port=free_port(), max_batch_size=16, max_wait_ms=20, adapter_root=str(setup["root"]))
    with serving(create_app(p, config), config) as client:
        yield client


def _scores(own: np.ndarray) -> np.ndarray:
    e = np.exp(own - own.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_http_mixed_adapters_and_listing(setup, http):
    own = _own_logits(setup, TEXTS)
    for name in ("rank0", "qv3"):
        response = http.post("/v1/predict", json={"adapter": name, "inputs": TEXTS})
        assert response.status_code == 200
        got = np.array([list(r["scores"].values()) for r in response.json()["predictions"]])
        np.testing.assert_allclose(got, _scores(own[name]), atol=1e-4)
    listed = {a["name"]: a for a in http.get("/v1/adapters").json()["adapters"]}
    ranks = json.loads((setup["packs"]["qv3"] / ADAPTER_MANIFEST_FILE).read_text())["ranks"]
    assert listed["qv3"]["ranks"] == ranks and listed["qv3"]["task"] == "sequence-classification"
    assert listed["qv3"]["num_labels"] == 3 and set(listed) == {"rank0", "qv3"}


def test_http_hot_load_and_unload_under_load_fail_no_request_of_staying_adapters(setup, http):
    import threading

    own = {n: _scores(v) for n, v in _own_logits(setup, TEXTS).items()}
    failures, done, stop = [], [0], threading.Event()

    def client_loop(k: int):
        import httpx

        with httpx.Client(base_url=str(http.base_url), timeout=60) as c:
            while not stop.is_set():
                name = ("rank0", "qv3")[k % 2]
                i = done[0] % len(TEXTS)
                r = c.post("/v1/predict", json={"adapter": name, "inputs": [TEXTS[i]]})
                got = list(r.json()["predictions"][0]["scores"].values()) if r.status_code == 200 else None
                if got is None or not np.allclose(got, own[name][i], atol=1e-4):
                    failures.append((name, r.status_code, r.text[:200]))
                done[0] += 1

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    load_ms = []
    try:
        for _ in range(3):
            for name in ("ffn3", "peft"):
                r = http.put(f"/v1/adapters/{name}", json={"path": str(setup["packs"][name])})
                assert r.status_code == 200, r.text
                load_ms.append(r.json()["load_ms"])
            r = http.post("/v1/predict", json={"adapter": ["ffn3", "peft", "rank0"], "inputs": TEXTS[:3]})
            assert r.status_code == 200 and [p["adapter"] for p in r.json()["predictions"]] == ["ffn3", "peft", "rank0"]
            np.testing.assert_allclose(list(r.json()["predictions"][0]["scores"].values()), own["ffn3"][0], atol=1e-4)
            for name in ("ffn3", "peft"):
                assert http.delete(f"/v1/adapters/{name}").status_code == 200
            assert http.post("/v1/predict", json={"adapter": "ffn3", "inputs": ["x"]}).status_code == 404
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and done[0] >= 8
    assert {a["name"] for a in http.get("/v1/adapters").json()["adapters"]} == {"rank0", "qv3"}


def test_http_refusals_keep_serving(setup, http, tmp_path):
    root = setup["root"]
    outside = http.put("/v1/adapters/x", json={"path": str(setup["packs"]["ffn3"].parent.parent)})
    assert outside.status_code == 403 and "outside --adapter-root" in outside.json()["error"]
    assert http.put("/v1/adapters/x", json={"path": "../"}).status_code == 403
    corrupt = root / "pack-corrupt"
    if not corrupt.exists():
        shutil.copytree(setup["packs"]["ffn3"], corrupt)
        (corrupt / ADAPTER_PACK_FILE).write_bytes(b"\x00" * 16)
    r = http.put("/v1/adapters/ffn3", json={"path": "pack-corrupt"})
    assert r.status_code == 422 and "corrupt" in r.json()["error"]
    other_base = save_tiny_bert(tmp_path / "other-base", seed=9)
    other = export(make_adapter(tmp_path / "ck", other_base, 2, seed=1), root / "pack-other", mode="adapter",
                   prune_ranks=True, overwrite=True)
    r = http.put("/v1/adapters/qv3", json={"path": str(other)})
    assert r.status_code == 422 and "another base model" in r.json()["error"]
    assert http.post("/v1/predict", json={"adapter": "nope", "inputs": ["x"]}).status_code == 404
    assert http.delete("/v1/adapters/nope").status_code == 404
    assert http.post("/v1/predict", json={"inputs": ["x"]}).status_code == 422  # a multi graph needs "adapter"
    listed = {a["name"] for a in http.get("/v1/adapters").json()["adapters"]}
    assert listed == {"rank0", "qv3"}
    ok = http.post("/v1/predict", json={"adapter": "qv3", "inputs": TEXTS[:2]})
    own = _scores(_own_logits(setup, TEXTS[:2])["qv3"])
    np.testing.assert_allclose([list(p["scores"].values()) for p in ok.json()["predictions"]], own, atol=1e-4)


def test_hot_loading_is_off_without_adapter_root(setup):
    from adalora_deploy.runtime.server import ServerConfig, create_app

    from .test_server import free_port, serving

    p = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cpu")
    p.load_adapter("rank0", setup["packs"]["rank0"])
    config = ServerConfig(port=free_port())
    with serving(create_app(p, config), config) as client:
        r = client.put("/v1/adapters/qv3", json={"path": str(setup["packs"]["qv3"])})
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]
        assert client.delete("/v1/adapters/rank0").status_code == 403
        assert client.post("/v1/predict", json={"adapter": "rank0", "inputs": ["x"]}).status_code == 200


def test_synthetic_bench_packs_have_uneven_ranks_and_load(setup, tmp_path):
    from adalora_deploy.bench.multi import synthetic_packs

    packs = synthetic_packs(setup["packs"]["rank0"], tmp_path, 3)
    ranks = [json.loads((p / ADAPTER_MANIFEST_FILE).read_text())["ranks"] for p in packs]
    top = max(json.loads((setup["packs"]["rank0"] / ADAPTER_MANIFEST_FILE).read_text())["ranks"].values())
    assert all(0 <= r <= top for rr in ranks for r in rr.values()) and ranks[0] != ranks[1]
    assert any(r == 0 for rr in ranks for r in rr.values())
    p = Predictor.from_pretrained(setup["multi"], mode="multi", provider="cpu")
    for i, pack in enumerate(packs):
        p.load_adapter(f"s{i}", pack)
    got = p.predict(TEXTS[:3], adapter=["s0", "s1", "s2"])
    assert [len(r["scores"]) for r in got.records()] == [2, 3, 2]


def test_multi_graph_is_fused_with_every_linear_as_a_run_time_branch(setup):
    import onnx

    manifest = json.loads((setup["multi"] / "multi" / "adalora_manifest.json").read_text())
    assert manifest["optimized"] and manifest["graph"]["fused_ops"]["MultiHeadAttention"] == 2  # both layers
    assert manifest["validation"]["validated"] and manifest["validation"]["max_abs_diff"] <= 1e-4
    inputs = {i.name for i in onnx.load(str(setup["multi"] / "multi" / "model.onnx")).graph.input}
    assert {m + DOWN_SUFFIX for m in manifest["modules"]} <= inputs and len(manifest["modules"]) == 2 * 6 + 1
