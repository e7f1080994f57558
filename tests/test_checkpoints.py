"""lerpfast.checkpoints: every accepted source loads bit-exactly, every bad checkpoint gets its named error."""

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lerpfast.checkpoints import CheckpointError, describe, load_checkpoints, load_state, match_to_model


class TinyNet(nn.Module):
    """Linear + Conv2d + BatchNorm2d: float parameters, float buffers and an int64 buffer."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # not state: never in a checkpoint

    def forward(self, x):  # (B, 3, H, W) -> (B, 5)
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Unpicklable:
    """An arbitrary class: torch.load(weights_only=True) must refuse a file that pickles one."""

    def __init__(self):
        self.note = "not a tensor"


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics and counter, so a dropped buffer would show
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(7)
    return net


@pytest.fixture
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------------------
# good sources


def test_module_source_is_a_detached_clone(model):
    got = load_state(model)
    assert_state_equal(got, model.state_dict())
    for k, p in model.named_parameters():
        assert not got[k].requires_grad
        assert got[k].data_ptr() != p.data_ptr()
    got["fc.weight"].add_(1.0)  # must not reach the live model
    assert not torch.equal(got["fc.weight"], model.fc.weight)


def test_state_dict_source_is_a_clone(state):
    got = load_state(state)
    assert_state_equal(got, state)
    assert all(got[k].data_ptr() != state[k].data_ptr() for k in state)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_file_round_trip(tmp_path, model, state, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(state, path)
    got = match_to_model(load_state(path), model, label="c")
    assert_state_equal(got, model.state_dict())


def test_legacy_torch_file_round_trip(tmp_path, model, state):
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_state_equal(match_to_model(load_state(str(path)), model, label="c"), model.state_dict())


def test_safetensors_round_trip(tmp_path, model, state):
    path = tmp_path / "ckpt.safetensors"
    save_file(state, str(path))
    assert_state_equal(match_to_model(load_state(path), model, label="c"), model.state_dict())


def test_num_batches_tracked_is_carried_as_int64(tmp_path, model, state):
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    fresh = TinyNet()  # counter 0: the checkpoint's 7 must win
    got = load_checkpoints([path], fresh)[0]
    assert got["bn.num_batches_tracked"].dtype == torch.int64
    assert got["bn.num_batches_tracked"].item() == 7


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 0.1}},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        lambda sd: {"model": sd, "args": ["--lr", "0.1"]},
        lambda sd: {"net": sd, "acc": 93.1},
        lambda sd: {"model": {"state_dict": sd}, "step": 10},
        # Lightning: LightningModule.state_dict() prefixes the network's keys with its attribute name
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10},
    ],
    ids=["state_dict", "model_state_dict", "model", "net", "nested", "lightning"],
)
@pytest.mark.parametrize("via_file", [False, True], ids=["mapping", "file"])
def test_wrappers_are_unwrapped(tmp_path, model, state, wrap, via_file):
    source = wrap(state)
    if via_file:
        source = tmp_path / "wrapped.ckpt"
        torch.save(wrap(state), source)
    got = match_to_model(load_state(source), model, label="wrapped")
    assert_state_equal(got, model.state_dict())


def test_wrapper_holding_a_module(model):
    assert_state_equal(load_state({"model": model, "epoch": 1}), model.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(model, state, prefix):
    prefixed = {prefix + k: v for k, v in state.items()}
    assert_state_equal(match_to_model(prefixed, model, label="ddp"), model.state_dict())


def test_prefix_stripped_even_with_a_missing_key(model, state):
    # the error must name 'fc.bias', not report every key as unexpected
    prefixed = {"module." + k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(CheckpointError, match=r"does not match the model TinyNet: 1 missing key .*: 'fc\.bias'$"):
        match_to_model(prefixed, model, label="ddp")


def test_compiled_checkpoint_for_data_parallel_model(model, state):
    compiled = {"_orig_mod." + k: v for k, v in state.items()}
    wrapped = nn.DataParallel(model)
    assert_state_equal(match_to_model(compiled, wrapped, label="c"), wrapped.state_dict())


def test_data_parallel_checkpoint_and_model(model, state):
    ddp_state = nn.DataParallel(model).state_dict()  # real 'module.' keys, no GPU needed
    assert all(k.startswith("module.") for k in ddp_state)
    assert_state_equal(match_to_model(load_state(ddp_state), model, label="dp"), model.state_dict())
    # and the other way round: a plain checkpoint for a wrapped model gets the prefix added
    wrapped = nn.DataParallel(model)
    got = match_to_model(load_state(state), wrapped, label="plain")
    assert_state_equal(got, wrapped.state_dict())


def test_output_follows_model_order(model, state):
    shuffled = dict(reversed(list(state.items())))
    assert list(match_to_model(shuffled, model, label="c")) == list(model.state_dict())


def test_non_persistent_buffer_in_checkpoint_is_ignored(model, state):
    got = match_to_model({**state, "scratch": torch.ones(2)}, model, label="c")
    assert "scratch" not in got


def test_missing_num_batches_tracked_is_filled_from_model(model, state):
    del state["bn.num_batches_tracked"]  # checkpoints saved before torch 0.4.1 lack the counter
    got = match_to_model(state, model, label="old")
    assert got["bn.num_batches_tracked"].item() == 7


def test_load_checkpoints_mixed_sources(tmp_path, model, state):
    path = tmp_path / "a.pt"
    torch.save(state, path)
    got = load_checkpoints([model, state, path, {"state_dict": state}], model)
    assert len(got) == 4
    for sd in got:
        assert_state_equal(sd, model.state_dict())


# ----------------------------------------------------------------------------------------------------
# bad checkpoints: each error names the checkpoint and the offending key


def test_missing_key(model, state):
    del state["fc.bias"]
    with pytest.raises(CheckpointError, match=r"checkpoint 'ckpt_a'.*1 missing key.*'fc\.bias'"):
        match_to_model(state, model, label="ckpt_a")


def test_unexpected_key(model, state):
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"checkpoint 'ckpt_a'.*1 unexpected key.*'head\.weight'"):
        match_to_model(state, model, label="ckpt_a")


def test_many_missing_keys_show_five_and_a_count(model, state):
    state = {"bn.num_batches_tracked": state["bn.num_batches_tracked"]}
    with pytest.raises(CheckpointError, match=r"8 missing keys .*: 'conv\.weight', .*'bn\.running_mean', "
                                              r"\.\.\. and 3 more$") as info:
        match_to_model(state, model, label="ckpt_a")
    assert len(re.findall(r"'[a-z]+\.[a-z_]+'", str(info.value))) == 5


def test_wrong_shape(model, state):
    state["fc.weight"] = torch.zeros(5, 6)
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 'ckpt_b'.*1 shape mismatch: 'fc\.weight': model \(5, 4\), "
                             r"checkpoint \(5, 6\)"):
        match_to_model(state, model, label="ckpt_b")


def test_wrong_dtype(model, state):
    state["conv.weight"] = state["conv.weight"].double()
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 'ckpt_b'.*1 dtype mismatch: 'conv\.weight': model torch\.float32, "
                             r"checkpoint torch\.float64"):
        match_to_model(state, model, label="ckpt_b")


def test_all_problems_reported_together(model, state):
    del state["fc.bias"]
    state["extra"] = torch.zeros(1)
    state["bn.weight"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match=r"missing key.*'fc\.bias'.*unexpected key.*'extra'.*'bn\.weight'"):
        match_to_model(state, model, label="c")


def test_nan(model, state):
    state["conv.bias"][[0, 2]] = float("nan")
    with pytest.raises(CheckpointError, match=r"checkpoint 'ckpt_c': tensor 'conv\.bias' has 2 NaN of 4 values"):
        match_to_model(state, model, label="ckpt_c")


def test_inf_in_a_buffer(model, state):
    state["bn.running_var"][1] = float("inf")
    state["fc.weight"][0, 0] = -float("inf")
    with pytest.raises(CheckpointError,
                       match=r"tensor 'bn\.running_var' has 1 Inf of 4 values; also non-finite: 'fc\.weight'"):
        match_to_model(state, model, label="ckpt_c")


def test_nan_in_file_names_the_path(tmp_path, model, state):
    state["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*'fc\.weight' has 1 NaN"):
        load_checkpoints([path], model)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=re.escape(repr(str(path))) + ": file not found"):
        load_state(path)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_state(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*(not a torch\.save file|not a readable)"):
        load_state(path)


def test_truncated_file(tmp_path, state):
    path = tmp_path / "truncated.pt"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_state(path)


def test_weights_only_refusal(tmp_path, state):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": state, "extra": Unpicklable()}, path)
    with pytest.raises(CheckpointError,
                       match=re.escape(str(path)) + r".*weights_only=True\) refused it.*Unpicklable.*"
                             r"Re-save it as a plain state_dict") as info:
        load_state(path)
    assert info.value.__cause__ is not None  # torch's full message stays reachable


def test_label_and_path_both_named(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint 'theta0' \(.*nope\.pt\): file not found"):
        load_state(path, label="theta0")


def test_non_tensor_entries_without_wrapper(state):
    with pytest.raises(CheckpointError, match=r"checkpoint 'ckpt_d'.*1 non-tensor entry \('epoch'\)"):
        load_state({**state, "epoch": 3}, label="ckpt_d")


def test_file_holding_no_mapping(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*holds a list"):
        load_state(path)


def test_empty_state_dict():
    with pytest.raises(CheckpointError, match="'empty'.*is empty"):
        load_state({}, label="empty")


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="got int"):
        load_state(3)


def test_default_labels_name_the_bad_checkpoint(tmp_path, model, state):
    bad = dict(state)
    del bad["fc.bias"]
    with pytest.raises(CheckpointError, match=r"checkpoint 'checkpoint\[1\]'.*'fc\.bias'"):
        load_checkpoints([model, bad], model)
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 'model\[1\]'.*'conv\.bias': model \(4,\), checkpoint \(6,\)"):
        load_checkpoints([state, TinyNet(width=6)], model)
    with pytest.raises(CheckpointError, match=r"checkpoint 'b'"):
        load_checkpoints([state, bad], model, labels=["a", "b"])


def test_load_checkpoints_argument_errors(tmp_path, model, state):
    with pytest.raises(ValueError, match="one label per source"):
        load_checkpoints([state, state], model, labels=["a"])
    with pytest.raises(TypeError, match="sequence of checkpoints"):
        load_checkpoints(str(tmp_path / "a.pt"), model)


# ----------------------------------------------------------------------------------------------------
# describe


def test_describe_file(tmp_path, monkeypatch, state):
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    info = describe(str(path))
    raw = path.read_bytes()
    assert info == {"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    assert json.loads(json.dumps(info)) == info
    monkeypatch.chdir(tmp_path)  # relative paths are made absolute
    assert describe("ckpt.pt") == info


def test_describe_safetensors_file(tmp_path, state):
    path = tmp_path / "ckpt.safetensors"
    save_file(state, str(path))
    assert describe(path)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_describe_in_memory_is_stable(model, state):
    info = describe(model)
    assert info["type"] == "module" and len(info["sha256"]) == 64
    assert json.loads(json.dumps(info)) == info
    assert describe(model) == info
    # same names and values -> same hash, whatever the container, key order or memory layout
    relaid = {k: v.t().contiguous().t() if v.dim() == 2 else v.clone() for k, v in reversed(state.items())}
    assert not relaid["fc.weight"].is_contiguous()
    assert describe(relaid) == {"type": "state_dict", "sha256": info["sha256"]}
    assert describe({"state_dict": state})["sha256"] == info["sha256"]
    # any change of a value, or of a dtype, changes it
    changed = dict(state, **{"fc.bias": state["fc.bias"] + 1e-7})
    assert describe(changed)["sha256"] != info["sha256"]
    assert describe(dict(state, **{"bn.num_batches_tracked": torch.tensor(7, dtype=torch.int32)}))["sha256"] != \
        info["sha256"]


def test_describe_hash_matches_documented_scheme():
    # Pinned to the scheme in describe's docstring, so a hash recorded by one run can be checked by another.
    sd = {"b": torch.arange(3, dtype=torch.int64), "a": torch.tensor([[1.5, -2.0]], dtype=torch.float32)}
    h = hashlib.sha256()
    for key, shape, dtype, raw in [("a", [1, 2], "float32", sd["a"].numpy().tobytes()),
                                   ("b", [3], "int64", sd["b"].numpy().tobytes())]:
        h.update(json.dumps([key, dtype, shape, len(raw)]).encode())
        h.update(raw)
    assert describe(sd)["sha256"] == h.hexdigest()


def test_describe_bfloat16():
    sd = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    assert describe(sd)["sha256"] != describe({"w": sd["w"].half()})["sha256"]


def test_describe_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt'.*file not found"):
        describe(tmp_path / "nope.pt")
