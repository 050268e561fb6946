"""Bad files on disk: every damaged model folder, safetensors file, config, tokenizer, scheduler config or LoRA
file is refused early, by name (the file, and the field or tensor), with an error the CLI maps to exit 1
(a ValueError or an OSError), and a fault in a config or the tokenizer stops before any weights are converted.

Each case copies the tiny random SD folder (`tiny_sd_folder`), damages one thing and loads it through the
public entry points (`checkpoint.load` / `read_config`, `load_tokenizer`, `schedulers.SchedulerConfig.from_dict`,
`lora_files.check`). `test_undamaged_copy_loads` is the control: the same entry points accept the undamaged copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import shutil
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from sdjax import checkpoint, convert, io, lora_files, schedulers
from sdjax import lora as L
from sdjax.tokenizer import load_tokenizer

WEIGHTS = {"text_encoder": "text_encoder/model.safetensors", "unet": "unet/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors"}
TE = WEIGHTS["text_encoder"]
TE_KEY = "encoder.layers.0.mlp.fc1.weight"  # a float parameter of the tiny text encoder, [64, 32]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    entry: str  # what loads it: "load:<kind>", "config:<kind>", "tokenizer", "scheduler" or "lora"
    damage: Callable[[pathlib.Path], object]  # damages the copied folder (a LoRA case returns the LoRA file)
    error: type[Exception]
    file: str  # the file (relative to the folder) the message must name; "" for scheduler dicts
    match: str  # a regex the message must also contain (field, tensor, what is allowed)


# ---- damaging helpers -------------------------------------------------------------------------------------------

def _split(path: pathlib.Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(path: pathlib.Path, header, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def overlap(folder):
    path = folder / TE
    header, body = _split(path)
    second = _by_offset(header)[1]
    header[second]["data_offsets"] = [n - 4 for n in header[second]["data_offsets"]]
    _join(path, header, body)


def gap(folder):
    """8 bytes nobody owns before the 2nd tensor (every later tensor moved up, the data kept consistent)."""
    path = folder / TE
    header, body = _split(path)
    keys = _by_offset(header)
    start = header[keys[1]]["data_offsets"][0]
    for key in keys[1:]:
        header[key]["data_offsets"] = [n + 8 for n in header[key]["data_offsets"]]
    _join(path, header, body[:start] + b"\0" * 8 + body[start:])


def cut(fraction: float):
    def damage(folder):
        path = folder / TE
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return damage


def cut_last_bytes(folder):
    path = folder / TE
    path.write_bytes(path.read_bytes()[:-16])


def header_size_too_big(folder):
    path = folder / TE
    data = path.read_bytes()
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])


def header_not_json(folder):
    path = folder / TE
    header, body = _split(path)
    raw = json.dumps(header).encode()
    _join(path, b"not json!" + b"#" * (len(raw) - 9), body)


def header_list(folder):
    _join(folder / TE, [1, 2, 3], b"")


def header_entry(key: str, **fields):
    def damage(folder):
        path = folder / TE
        header, body = _split(path)
        header[key].update(fields)
        _join(path, header, body)
    return damage


def drop_offsets(folder):
    path = folder / TE
    header, body = _split(path)
    del header[TE_KEY]["data_offsets"]
    _join(path, header, body)


def longer_shape(folder):
    path = folder / TE
    header, body = _split(path)
    header[TE_KEY]["shape"] = [65, 32]  # 65 x 32 x 4 bytes, but the offsets keep 64 x 32 x 4
    _join(path, header, body)


def edit_state(rel: str, edit: Callable[[dict], None]):
    def damage(folder):
        path = folder / rel
        state = safetensors.numpy.load_file(path)
        edit(state)
        safetensors.numpy.save_file(state, path)
    return damage


def poke(key: str, value: float):
    def edit(state):
        state[key] = state[key].copy()
        state[key].flat[3] = value
    return edit


def relabel(key: str, dtype) -> Callable[[dict], None]:
    """The same bytes labelled with another dtype (float data read as integers)."""
    def edit(state):
        state[key] = state[key].view(dtype)
    return edit


def cast(key: str, dtype) -> Callable[[dict], None]:
    def edit(state):
        state[key] = state[key].astype(dtype)
    return edit


def config_text(kind: str, text: str):
    def damage(folder):
        (folder / kind / "config.json").write_text(text)
    return damage


def config_field(kind: str, **fields):
    def damage(folder):
        path = folder / kind / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return damage


def delete(*rels: str):
    def damage(folder):
        for rel in rels:
            (folder / rel).unlink()
    return damage


def write(rel: str, text: str):
    def damage(folder):
        (folder / rel).write_text(text)
    return damage


def truncate_text(rel: str):
    def damage(folder):
        path = folder / rel
        path.write_text(path.read_text()[: 1000])
    return damage


def scheduler_field(**fields):
    def damage(folder):
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return damage


# ---- LoRA files: a good one for the tiny model, then damaged --------------------------------------------------

LORA_KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"  # [2, 32]


def _configs(folder) -> dict:
    return {kind: checkpoint.read_config(folder / kind, kind) for kind in ("unet", "text_encoder")}


_abstract_params = functools.cache(checkpoint.abstract_params)  # traced once per config for the whole module


def _lora_tensors(configs: dict) -> tuple[dict, dict]:
    abstract = {kind: _abstract_params(kind, cfg) for kind, cfg in configs.items()}
    lora = L.init(jax.random.key(0), abstract, rank=2, targets="unet+te", configs=configs)
    lora = jax.tree.map(lambda a: a + 0.01, lora)  # up factors start at zero: make every value nonzero
    return lora_files.to_state_dict(lora, "peft")


def lora_file(edit: Callable[[dict], None] | None = None, *, configs: Callable[[dict], dict] | None = None,
              name: str = "lora.safetensors"):
    """Damage that writes `folder/name`: a peft LoRA for the folder's model (or for `configs(model's)`), edited."""
    def damage(folder):
        cfgs = _configs(folder)
        tensors, meta = _lora_tensors(configs(cfgs) if configs else cfgs)
        if edit:
            edit(tensors)
        io.write_safetensors(tensors, folder / name, metadata=meta)
        return folder / name
    return damage


def raw_file(name: str, data: bytes):
    def damage(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return damage


def other_size(**unet):
    return lambda cfgs: {**cfgs, "unet": dataclasses.replace(cfgs["unet"], **unet)}


def add(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def rank3_b(tensors):
    key = LORA_KEY.replace("lora_A", "lora_B")
    tensors[key] = np.ones((tensors[key].shape[0], 3), np.float32)


# ---- the table ----------------------------------------------------------------------------------------------

S, C = io.SafetensorsError, checkpoint.CheckpointError
F32_BYTES = 64 * 32 * 4
CASES = [
    # safetensors layout, refused by the safetensors library when the file is opened (before any tracing)
    Case("st-overlapping-offsets", "load:text_encoder", overlap, S, TE, r"overlap"),
    Case("st-gap-between-tensors", "load:text_encoder", gap, S, TE, r"gap of 8 bytes"),
    Case("st-truncated-half", "load:text_encoder", cut(0.5), S, TE, r"truncated: tensor '[^']+' ends at byte"),
    Case("st-truncated-last-bytes", "load:text_encoder", cut_last_bytes, S, TE, r"truncated"),
    Case("st-header-size-beyond-file", "load:text_encoder", header_size_too_big, S, TE,
         r"truncated or not a safetensors file: its first 8 bytes give a header of \d+ bytes"),
    Case("st-too-short", "load:text_encoder", write(TE, "abc"), S, TE, r"not a safetensors file: only \d+ bytes"),
    Case("st-header-not-json", "load:text_encoder", header_not_json, S, TE, r"header is not valid safetensors JSON"),
    Case("st-header-json-list", "load:text_encoder", header_list, S, TE, r"header is a JSON list"),
    Case("st-dtype-unknown", "load:text_encoder", header_entry(TE_KEY, dtype="Q4"), S, TE,
         rf"tensor '{re.escape(TE_KEY)}' has dtype 'Q4'.*known: BOOL"),
    Case("st-offsets-not-shape-x-dtype", "load:text_encoder", longer_shape, S, TE,
         rf"'{re.escape(TE_KEY)}' has data_offsets \[\d+, \d+\] \({F32_BYTES} bytes\).*need {65 * 32 * 4} bytes"),
    Case("st-offsets-out-of-bounds", "load:text_encoder", header_entry(TE_KEY, data_offsets=[0, 10 ** 9]), S, TE,
         re.escape(TE_KEY)),
    Case("st-missing-data-offsets", "load:text_encoder", drop_offsets, S, TE,
         rf"'{re.escape(TE_KEY)}'.*not \{{dtype, shape, data_offsets\}}"),
    # tensors that do not fit the architecture or are not float weights (checked from the header, then per tensor)
    Case("w-float-param-stored-as-I32", "load:text_encoder", edit_state(TE, relabel(TE_KEY, np.int32)), C, TE,
         rf"'{re.escape(TE_KEY)}' has dtype I32, but it is a floating-point parameter \(allowed: F16, BF16, F32, F64"),
    Case("w-float-param-stored-as-U8", "load:vae", edit_state(WEIGHTS["vae"], relabel("decoder.conv_in.bias",
                                                                                      np.uint8)),
         C, WEIGHTS["vae"], r"'decoder.conv_in.bias' has dtype U8"),
    Case("w-float-param-stored-as-BOOL", "load:text_encoder",
         edit_state(TE, cast("final_layer_norm.bias", np.bool_)), C, TE, r"'final_layer_norm.bias' has dtype BOOL"),
    Case("w-float-param-stored-as-F8", "load:text_encoder", header_entry(TE_KEY, dtype="F8_E4M3", shape=[64, 128]),
         C, TE, rf"'{re.escape(TE_KEY)}' has dtype F8_E4M3, but it is a floating-point parameter"),
    Case("w-nan", "load:text_encoder", edit_state(TE, poke(TE_KEY, np.nan)), C, TE,
         rf"'{re.escape(TE_KEY)}' holds 1 non-finite value\(s\) \(NaN or inf\)"),
    Case("w-inf", "load:vae", edit_state(WEIGHTS["vae"], poke("encoder.conv_in.weight", -np.inf)), C,
         WEIGHTS["vae"], r"'encoder.conv_in.weight' holds 1 non-finite"),
    Case("w-nan-in-bf16", "load:text_encoder",
         edit_state(TE, lambda s: (cast(TE_KEY, ml_dtypes.bfloat16)(s), poke(TE_KEY, np.nan)(s))), C, TE,
         r"non-finite"),
    Case("w-missing-tensor", "load:text_encoder", edit_state(TE, lambda s: s.pop(TE_KEY)), C, TE,
         rf"missing key\(s\) '{re.escape(TE_KEY)}'"),
    Case("w-extra-tensor", "load:vae",
         edit_state(WEIGHTS["vae"], add("decoder.extra.weight", np.zeros(3, np.float32))), C, WEIGHTS["vae"],
         r"unexpected key\(s\) 'decoder.extra.weight'"),
    Case("w-wrong-shape", "load:unet",
         edit_state(WEIGHTS["unet"], add("conv_in.weight", np.zeros((32, 4, 5, 5), np.float32))), C,
         WEIGHTS["unet"], r"'conv_in.weight' has shape \(32, 4, 5, 5\).*needs \(32, 4, 3, 3\)"),
    Case("w-weights-file-missing", "load:vae", delete(WEIGHTS["vae"]), FileNotFoundError, "vae",
         r"diffusion_pytorch_model\.safetensors"),
    # component configs (no weights are converted: read_config and checkpoint.load both stop at the config)
    Case("cfg-json-list", "config:unet", config_text("unet", "[1, 2]"), C, "unet/config.json",
         r"unet config must be a JSON object of fields, got a JSON list"),
    Case("cfg-not-json", "config:vae", config_text("vae", '{"block_out_channels": [32,'), C, "vae/config.json",
         r"not valid JSON"),
    Case("cfg-missing", "config:text_encoder", delete("text_encoder/config.json"), FileNotFoundError,
         "text_encoder/config.json", r"does not exist"),
    Case("cfg-layers-per-block-negative", "config:unet", config_field("unet", layers_per_block=-3), C,
         "unet/config.json", r"'layers_per_block' must be an integer >= 1, got -3"),
    Case("cfg-vae-layers-per-block-zero", "config:vae", config_field("vae", layers_per_block=0), C,
         "vae/config.json", r"'layers_per_block' must be an integer >= 1, got 0"),
    Case("cfg-block-out-channels-empty", "config:unet", config_field("unet", block_out_channels=[]), C,
         "unet/config.json", r"'block_out_channels' must be a non-empty list of integers >= 1, got \[\]"),
    Case("cfg-block-out-channels-zero", "config:vae", config_field("vae", block_out_channels=[32, 0, 64, 64]), C,
         "vae/config.json", r"'block_out_channels' must be a non-empty list of integers >= 1, got \[32, 0, 64, 64\]"),
    Case("cfg-block-out-channels-strings", "config:unet", config_field("unet", block_out_channels=["32", "64", "64"]),
         C, "unet/config.json", r"'block_out_channels' must be a non-empty list of integers >= 1"),
    Case("cfg-block-out-channels-null", "config:unet", config_field("unet", block_out_channels=None), C,
         "unet/config.json", r"'block_out_channels' must be a non-empty list of integers >= 1, got None"),
    Case("cfg-heads-not-dividing", "config:unet", config_field("unet", attention_head_dim=3), C,
         "unet/config.json", r"'attention_head_dim' gives block 0 3 attention heads, which must divide its "
                             r"block_out_channels\[0\] = 32"),
    Case("cfg-heads-zero", "config:unet", config_field("unet", attention_head_dim=[2, 0, 2]), C, "unet/config.json",
         r"'attention_head_dim' must be an integer >= 1 or a list of 3 integers >= 1"),
    Case("cfg-norm-groups-not-dividing", "config:unet", config_field("unet", norm_num_groups=12), C,
         "unet/config.json", r"'norm_num_groups' = 12 must divide every entry of block_out_channels"),
    Case("cfg-vae-norm-groups-not-dividing", "config:vae", config_field("vae", norm_num_groups=5), C,
         "vae/config.json", r"'norm_num_groups' = 5 must divide"),
    Case("cfg-unknown-down-block", "config:unet",
         config_field("unet", down_block_types=["CrossAttnDownBlock2D", "FancyDownBlock2D", "DownBlock2D"]), C,
         "unet/config.json", r"'down_block_types' = 'FancyDownBlock2D' is not supported.*CrossAttnDownBlock2D"),
    Case("cfg-block-types-wrong-count", "config:unet", config_field("unet", up_block_types=["UpBlock2D"]), C,
         "unet/config.json", r"'up_block_types' has 1 entries but block_out_channels has 3"),
    Case("cfg-cross-attention-dim-string", "config:unet", config_field("unet", cross_attention_dim="32"), C,
         "unet/config.json", r"'cross_attention_dim' must be an integer >= 1, got '32'"),
    Case("cfg-norm-eps-zero", "config:unet", config_field("unet", norm_eps=0), C, "unet/config.json",
         r"'norm_eps' must be a finite number > 0"),
    Case("cfg-flag-not-bool", "config:unet", config_field("unet", use_linear_projection="yes"), C,
         "unet/config.json", r"'use_linear_projection' must be true or false"),
    Case("cfg-vae-scaling-factor-string", "config:vae", config_field("vae", scaling_factor="0.18215"), C,
         "vae/config.json", r"'scaling_factor' must be a finite number > 0"),
    Case("cfg-vae-latent-channels-negative", "config:vae", config_field("vae", latent_channels=-4), C,
         "vae/config.json", r"'latent_channels' must be an integer >= 1, got -4"),
    Case("cfg-te-heads-not-dividing-hidden", "config:text_encoder", config_field("text_encoder",
                                                                                 num_attention_heads=5), C,
         "text_encoder/config.json", r"'num_attention_heads' = 5 must divide hidden_size = 32"),
    Case("cfg-te-vocab-size-zero", "config:text_encoder", config_field("text_encoder", vocab_size=0), C,
         "text_encoder/config.json", r"'vocab_size' must be an integer >= 1, got 0"),
    Case("cfg-te-layers-bool", "config:text_encoder", config_field("text_encoder", num_hidden_layers=True), C,
         "text_encoder/config.json", r"'num_hidden_layers' must be an integer >= 1, got True"),
    Case("cfg-te-unsupported-activation", "config:text_encoder", config_field("text_encoder", hidden_act=["gelu"]),
         C, "text_encoder/config.json", r"'hidden_act' = \['gelu'\] is not supported"),
    # tokenizer files (read before any weights; a missing tokenizer/ folder falls back to SD1.5's, with a warning)
    Case("tok-json-corrupt", "tokenizer", truncate_text("tokenizer/tokenizer.json"), C, "tokenizer/tokenizer.json",
         r"not valid JSON"),
    Case("tok-json-list", "tokenizer", write("tokenizer/tokenizer.json", "[]"), C, "tokenizer/tokenizer.json",
         r"must hold a JSON object, got a JSON list"),
    Case("tok-json-no-model", "tokenizer", write("tokenizer/tokenizer.json", '{"version": "1.0"}'), C,
         "tokenizer/tokenizer.json", r"has no 'model' object"),
    Case("tok-config-corrupt", "tokenizer", write("tokenizer/tokenizer_config.json", "{oops"), C,
         "tokenizer/tokenizer_config.json", r"not valid JSON"),
    Case("tok-files-missing", "tokenizer", delete("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"),
         FileNotFoundError, "tokenizer", r"neither tokenizer\.json nor vocab\.json \+ merges\.txt"),
    # scheduler configs (the dict as read from scheduler/scheduler_config.json; the pipeline names the file)
    Case("sched-json-list", "scheduler", write("scheduler/scheduler_config.json", "[1, 2]"), ValueError, "",
         r"scheduler config must be a JSON object of fields, got list"),
    Case("sched-beta-end-below-start", "scheduler", scheduler_field(beta_start=0.02, beta_end=0.01), ValueError, "",
         r"beta_end must be >= beta_start.*beta_start=0.02, beta_end=0.01"),
    Case("sched-beta-out-of-range", "scheduler", scheduler_field(beta_end=1.5), ValueError, "",
         r"beta_end must be a number in \(0, 1\), got 1.5"),
    Case("sched-unknown-beta-schedule", "scheduler", scheduler_field(beta_schedule="cosine"), ValueError, "",
         r"unsupported beta_schedule='cosine'; allowed: 'linear', 'scaled_linear'"),
    Case("sched-timesteps-string", "scheduler", scheduler_field(num_train_timesteps="1000"), ValueError, "",
         r"num_train_timesteps must be an integer >= 1, got '1000'"),
    Case("sched-class-name-not-string", "scheduler", scheduler_field(_class_name=["PNDMScheduler"]), ValueError,
         "", r"'_class_name' must be a class name string"),
    # LoRA files, checked against the model's configs (shapes only: no model weights are read)
    Case("lora-pickle-suffix", "lora", raw_file("lora.bin", b"\x80\x02}q\x00."), L.LoRAError, "lora.bin",
         r"is a pickle \(\.bin\); sdjax never unpickles"),
    Case("lora-not-safetensors", "lora", raw_file("lora.safetensors", b"\x80\x02}q\x00." * 20), L.LoRAError,
         "lora.safetensors", r"truncated or not a safetensors file"),
    Case("lora-missing-file", "lora", lambda f: f / "absent.safetensors", FileNotFoundError, "absent.safetensors",
         r"does not exist"),
    Case("lora-key-maps-to-nothing", "lora",
         lora_file(add("unet.mid_block.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight",
                       np.zeros((2, 64), np.float32))), L.LoRAError, "lora.safetensors",
         r"1 key\(s\) match no LoRA-able module.*attn9\.to_q\.lora_A\.weight"),
    Case("lora-wrong-rank-shapes", "lora", lora_file(rank3_b), L.LoRAError, "lora.safetensors",
         r"lora_B\.weight' has shape \(64, 3\), but the model needs \(64, 2\)"),
    Case("lora-other-cross-attention-dim", "lora", lora_file(configs=other_size(cross_attention_dim=48)),
         L.LoRAError, "lora.safetensors", r"attn2\.to_k\.lora_A\.weight' has shape \(2, 48\), but the model needs "
                                          r"\(rank, 32\)"),
    Case("lora-other-channels", "lora", lora_file(configs=other_size(block_out_channels=(64, 128, 128))),
         L.LoRAError, "lora.safetensors", r"has shape \(2, \d+\), but the model needs \(rank, \d+\)"),
    Case("lora-nan", "lora", lora_file(lambda t: t[LORA_KEY].__setitem__((0, 0), np.nan)), L.LoRAError,
         "lora.safetensors", rf"'{re.escape(LORA_KEY)}' holds 1 non-finite value\(s\)"),
    Case("lora-integer-dtype", "lora", lora_file(lambda t: t.__setitem__(LORA_KEY, t[LORA_KEY].astype(np.int32))),
         L.LoRAError, "lora.safetensors", rf"'{re.escape(LORA_KEY)}' has dtype I32, but LoRA weights must be "
                                          r"floating point"),
    Case("lora-no-tensors", "lora", lora_file(lambda t: t.clear()), L.LoRAError, "lora.safetensors",
         r"holds no tensors"),
]


# ---- running a case -------------------------------------------------------------------------------------------

@pytest.fixture
def model(tiny_sd_folder, tmp_path) -> pathlib.Path:
    """A writable copy of the tiny SD folder."""
    return pathlib.Path(shutil.copytree(tiny_sd_folder, tmp_path / "model"))


@pytest.fixture
def work(monkeypatch) -> dict[str, int]:
    """Counts weight work: safetensors files opened for weights (LazyTensors) and to_params conversions."""
    counts = {"opened": 0, "converted": 0}
    lazy_init, to_params = io.LazyTensors.__init__, convert.to_params

    def counting_init(self, *args, **kwargs):
        counts["opened"] += 1
        lazy_init(self, *args, **kwargs)

    def counting_to_params(*args, **kwargs):
        counts["converted"] += 1
        return to_params(*args, **kwargs)

    monkeypatch.setattr(io.LazyTensors, "__init__", counting_init)
    monkeypatch.setattr(convert, "to_params", counting_to_params)
    return counts


def run(entry: str, folder: pathlib.Path, target) -> object:
    """Loads what `entry` names from `folder` (`target`: a LoRA case's file)."""
    kind = entry.partition(":")[2]
    if entry.startswith("load:"):
        return checkpoint.load(folder / kind, kind)
    if entry.startswith("config:"):
        return checkpoint.read_config(folder / kind, kind)
    if entry == "tokenizer":
        return load_tokenizer(folder)
    if entry == "scheduler":
        d = io.read_json(folder / "scheduler" / "scheduler_config.json")
        return schedulers.SchedulerConfig.from_dict(d), schedulers.from_diffusers_config(d)
    return lora_files.check(target, _configs(folder))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file_is_refused_by_name(case: Case, model, work):
    target = case.damage(model)
    with pytest.raises(case.error) as err:
        run(case.entry, model, target)
    message = str(err.value)
    assert isinstance(err.value, (ValueError, OSError))  # the CLI maps both to exit status 1
    if case.file:
        assert str(model / case.file) in message, message
    assert re.search(case.match, message), message
    if not case.entry.startswith("load:"):
        assert work["converted"] == 0  # configs, tokenizer, scheduler and LoRA faults: no weights converted
    if case.entry in ("tokenizer", "scheduler") or case.entry.startswith("config:"):
        assert work["opened"] == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.entry.startswith("config:") and c.error is C],
                         ids=lambda c: c.id)
def test_config_fault_stops_load_before_weights(case: Case, model, work):
    """checkpoint.load reads the config first: the same error, and no weights file is even opened."""
    case.damage(model)
    kind = case.entry.partition(":")[2]
    with pytest.raises(C, match=re.escape(str(model / case.file))):
        checkpoint.load(model / kind, kind)
    assert work == {"opened": 0, "converted": 0}


def test_undamaged_copy_loads(model, work):
    """The control: every entry point of the table accepts the undamaged copy (so each failure is the damage's)."""
    for kind in WEIGHTS:
        config, params = checkpoint.load(model / kind, kind)
        assert config == checkpoint.read_config(model / kind, kind)
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))
    assert work == {"opened": 3, "converted": 3}
    assert load_tokenizer(model)(["a photo"]).shape == (1, 77)
    run("scheduler", model, None)
    lora_files.check(lora_file()(model), _configs(model))
    assert work["converted"] == 3  # the LoRA check converted no weights


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)
