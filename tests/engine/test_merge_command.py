"""``tether merge`` on real model folders: a tiny Llama base and two "fine-tuned" copies that change known,
partly overlapping sets of coordinates. The merged folder must load (transformers and tether) and hold exactly
the merge written out here from the masks (not from tether.merge's code), for every method."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.engine.hf_helpers import tiny_llama_folder
from tether.cli import main

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def perturbed(base, path, masks, seed, *, fmt="safetensors"):
    """A copy of folder ``base`` whose weights change by +-(1e-3 + |N(0, 0.01)|) where ``masks`` say."""
    shutil.copytree(base, path)
    state = safetensors_torch.load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, mask in masks.items():
        step = torch.randn(state[name].shape, generator=g) * 0.01
        step = step.sign() * (step.abs() + 1e-3)
        state[name] = state[name] + torch.where(mask, step, torch.zeros_like(step))
    (path / "model.safetensors").unlink()
    if fmt == "bin":  # the older format, read with torch.load(weights_only=True)
        torch.save(state, path / "pytorch_model.bin")
    elif fmt == "sharded":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        model.load_state_dict(state, strict=False)
        model.save_pretrained(str(path), max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
    else:
        safetensors_torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_llama_folder(root / "base")
    state = safetensors_torch.load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    mask_a, mask_b = {}, {}
    for name, t in state.items():
        # layer 0 only model A changes, the final norm only B; elsewhere both change ~30 %, overlapping at random
        a = torch.rand(t.shape, generator=g) < 0.3
        b = torch.rand(t.shape, generator=g) < 0.3
        mask_a[name] = a & ~torch.tensor(name == "model.norm.weight")
        mask_b[name] = b & ~torch.tensor(name.startswith("model.layers.0."))
    a = perturbed(base, root / "a", mask_a, 1)
    b = perturbed(base, root / "b", mask_b, 2)
    return root, base, a, b


def load(path):
    return safetensors_torch.load_file(str(path / "model.safetensors"))


def expected(base, a, b, method, r=1.05, ratio="unique", t=1e-5):
    """The merge from the definitions: changed where |model - base| > t, shared where both changed."""
    sb, sa, s2 = load(base), load(a), load(b)
    da = {k: sa[k] - sb[k] for k in sb}
    db = {k: s2[k] - sb[k] for k in sb}
    ma = {k: da[k].abs() > t for k in sb}
    mb = {k: db[k].abs() > t for k in sb}
    changed = [sum(int(ma[k].sum()) for k in sb), sum(int(mb[k].sum()) for k in sb)]
    shared = sum(int((ma[k] & mb[k]).sum()) for k in sb)
    rho = [shared / (c - shared) if ratio == "unique" else shared / c for c in changed]
    lam = [1 + (r - 1) * min(1.0, x) for x in rho]
    out = {}
    for k in sb:
        both = ma[k] & mb[k]
        only_a, only_b = ma[k] & ~mb[k], mb[k] & ~ma[k]
        if method == "average":
            delta = (da[k] + db[k]) / 2
        else:
            la, lb = (lam if method == "ram-plus" else [1.0, 1.0])
            delta = torch.where(both, (da[k] * ma[k] + db[k] * mb[k]) / 2, la * da[k] * only_a + lb * db[k] * only_b)
        out[k] = sb[k] + delta
    return out, changed, shared, lam


@pytest.mark.parametrize("method,flags", [("ram-plus", []), ("ram", []), ("average", []),
                                          ("ram-plus", ["--rescale", "1.5", "--overlap-ratio", "changed"]),
                                          ("ram", ["--threshold", "0.005"])])
def test_merged_folder_loads_and_equals_the_reference(folders, tmp_path, capsys, method, flags):
    _, base, a, b = folders
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--models", str(a), str(b), "--out", str(out),
                 "--method", method, "--no-progress", *flags]) == 0
    opts = dict(zip(flags[::2], flags[1::2]))
    r, ratio = float(opts.get("--rescale", 1.05)), opts.get("--overlap-ratio", "unique")
    t = float(opts.get("--threshold", 1e-5))
    want, changed, shared, lam = expected(base, a, b, method, r, ratio, t)
    if t != 1e-5:  # the case under test: the threshold drops changes the default would keep
        assert want.keys() == expected(base, a, b, method)[0].keys()
        assert max((want[k] - expected(base, a, b, method)[0][k]).abs().max() for k in want) > 1e-3
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    got = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    if method != "average":  # the merge is not the average: unique coordinates kept at full size
        avg = expected(base, a, b, "average")[0]
        assert max((got[k] - avg[k]).abs().max() for k in want) > 1e-3
    record = json.loads((out / "tether_merge.json").read_text())
    assert [m["changed"] for m in record["models"]] == changed
    assert [m["shared"] for m in record["models"]] == [shared, shared]
    assert [m["rescale_lambda"] for m in record["models"]] == (
        pytest.approx(lam, rel=1e-12) if method == "ram-plus" else [1.0, 1.0])
    assert lam[0] != lam[1]  # the two models overlap differently, so RAM+ rescales them differently
    text = capsys.readouterr().out
    assert f"tether merge: {method}" in text and str(out) in text
    assert f"{record['models'][0]['shared_fraction']:6.1%}" in text
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    from tether.models.hf import load_hf  # what `tether train --model OUT` loads

    loaded, tok = load_hf(str(out))
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([tok.encode("12+7=")])).logits
    assert torch.isfinite(logits).all()


def test_sharded_and_bin_folders_merge_like_single_files(folders, tmp_path):
    root, base, a, b = folders
    sa, sb = load(a), load(b)
    masks_a = {k: (sa[k] - load(base)[k]).abs() > 1e-5 for k in sa}
    masks_b = {k: (sb[k] - load(base)[k]).abs() > 1e-5 for k in sb}
    a2 = perturbed(base, tmp_path / "a2", masks_a, 1, fmt="sharded")
    b2 = perturbed(base, tmp_path / "b2", masks_b, 2, fmt="bin")
    assert main(["merge", "--base", str(base), "--models", str(a2), str(b2), "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 0
    assert main(["merge", "--base", str(base), "--models", str(a), str(b), "--out", str(tmp_path / "o1"),
                 "--no-progress"]) == 0
    one, two = load(tmp_path / "o1"), load(tmp_path / "o2")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=0)
    assert not any(p.name.endswith(".index.json") or p.suffix == ".bin" for p in (tmp_path / "o2").iterdir())


def test_progress_lines(folders, tmp_path, capsys):
    _, base, a, b = folders
    assert main(["merge", "--base", str(base), "--models", str(a), str(b), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "counting changed coordinates" in text and "merging (ram-plus)" in text


def error(capsys, argv):
    assert main(["merge", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error_before_any_work(folders, tmp_path, capsys):
    root, base, a, b = folders
    out = tmp_path / "out"
    common = ["--base", str(base), "--out", str(out), "--no-progress"]
    assert "'rescale' is a setting of --method ram-plus" in error(
        capsys, [*common, "--models", str(a), "--method", "ram", "--rescale", "1.2"])
    assert "'overlap_ratio' is a setting of --method ram-plus" in error(
        capsys, [*common, "--models", str(a), "--method", "average", "--overlap-ratio", "changed"])
    assert "'rescale' must be >= 1" in error(capsys, [*common, "--models", str(a), "--rescale", "0.5"])
    assert "'threshold' must be >= 0" in error(capsys, [*common, "--models", str(a), "--threshold", "-1"])
    assert "given twice" in error(capsys, [*common, "--models", str(a), str(a)])
    assert "given twice (also as the base)" in error(capsys, [*common, "--models", str(base)])
    assert "no such folder" in error(capsys, [*common, "--models", str(tmp_path / "nope")])

    other = tiny_llama_folder(tmp_path / "wider", seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 48
    (other / "config.json").write_text(json.dumps(cfg))
    err = error(capsys, [*common, "--models", str(a), str(other)])
    assert f"model 2 {other}: config.json field 'hidden_size' is 48" in err

    lacking = tmp_path / "lacking"
    shutil.copytree(a, lacking)
    state = load(a)
    del state["model.norm.weight"]
    safetensors_torch.save_file(state, str(lacking / "model.safetensors"))
    err = error(capsys, [*common, "--models", str(a), str(lacking)])
    assert f"model 2 {lacking}: lacks parameter 'model.norm.weight'" in err

    reshaped = tmp_path / "reshaped"
    shutil.copytree(a, reshaped)
    state = load(a)
    state["model.norm.weight"] = torch.ones(31)
    safetensors_torch.save_file(state, str(reshaped / "model.safetensors"))
    err = error(capsys, [*common, "--models", str(reshaped)])
    assert f"model 1 {reshaped}: parameter 'model.norm.weight' has shape (31,), the base has (32,)" in err

    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(base / "config.json", empty / "config.json")
    assert "no weights" in error(capsys, [*common, "--models", str(empty)])
    assert not out.exists()  # nothing was written by any failed call

    out.mkdir()
    (out / "x").write_text("taken")
    assert "exists and is not an empty folder" in error(capsys, [*common, "--models", str(a)])


def test_tiny_export_base_merges_with_a_save_pretrained_model(tmp_path):
    """tether's tiny-model folder writes a short config.json, save_pretrained a full one: the defaults only one
    file spells out are not an architecture difference."""
    from tether.models.builtin import tiny_model
    from tether.models.tiny import TinyConfig, save_hf

    model, tok = tiny_model(0, TinyConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64))
    base = save_hf(model, tok, tmp_path / "base")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        hf_model.model.norm.weight.add_(0.5)
    hf_model.save_pretrained(str(tmp_path / "tuned"))
    assert set(json.loads((tmp_path / "tuned" / "config.json").read_text())) - set(
        json.loads((base / "config.json").read_text()))  # the case under test: keys only one side has
    assert main(["merge", "--base", str(base), "--models", str(tmp_path / "tuned"), "--out", str(tmp_path / "o"),
                 "--method", "ram", "--no-progress"]) == 0
    merged = load(tmp_path / "o")
    torch.testing.assert_close(merged["model.norm.weight"], load(base)["model.norm.weight"] + 0.5)


def test_integer_tensors_must_match_and_are_copied(folders, tmp_path, capsys):
    """A non-floating tensor has no task vector: equal everywhere -> the base's copy; different -> an error."""
    _, base, a, _ = folders
    copies = {}
    for name, src, value in (("base", base, 7), ("same", a, 7), ("other", a, 8)):
        copies[name] = tmp_path / name
        shutil.copytree(src, copies[name])
        state = load(src)
        state["step_counter"] = torch.tensor([value], dtype=torch.int64)
        safetensors_torch.save_file(state, str(copies[name] / "model.safetensors"))
    out = tmp_path / "o"
    assert main(["merge", "--base", str(copies["base"]), "--models", str(copies["same"]), "--out", str(out),
                 "--no-progress"]) == 0
    assert load(out)["step_counter"].tolist() == [7]
    err = error(capsys, ["--base", str(copies["base"]), "--models", str(copies["other"]), "--out",
                         str(tmp_path / "o2"), "--no-progress"])
    assert "non-floating parameter 'step_counter' differs from the base's" in err
