"""The diffusers checkpoint folder layout: find a component, read its weights, assign them strictly.

A CogVideoX checkpoint (e.g. THUDM/CogVideoX-5b) is a root folder with one sub-folder per component
(`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). A weight folder holds `config.json`
and either one `*.safetensors` file or several shards listed in `*.safetensors.index.json`.

model.py and vae.py load through here. The rules are the same for both:
- The module is built on the meta device, so it takes no memory.
- Tensors are read memory-mapped and assigned in place with `load_state_dict(assign=True)`.
- Coverage is strict: every checkpoint tensor is used, every parameter is filled and every shape
  matches, or one error names the offenders. There is no `strict=False` anywhere.
"""

import json
import os

import torch
from torch import nn


def find_component(path: str, component: str, config: str = "config.json") -> str:
    """Resolve `path` to the folder of one component, e.g. "transformer".

    `path` may be a checkpoint root holding `component/`, that folder itself, or a Hugging Face hub id.
    A hub id is downloaded with huggingface_hub, only that component, when no such local path exists.
    The folder must hold `config` (the scheduler's is scheduler_config.json).
    """
    if not os.path.exists(path):
        if path.count("/") != 1 or path.startswith((".", "/")):
            raise FileNotFoundError(f"no folder '{path}': pass a checkpoint folder, a hub id such as "
                                    f"THUDM/CogVideoX-5b, or 'tiny'")  # fmt: skip
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=[f"{component}/*"])
        except Exception as err:  # offline, unknown repo, no access: all mean "cannot get it"
            raise FileNotFoundError(f"cannot download {component}/ of {path} from the hub: {err}") from None
    sub = os.path.join(path, component)
    folder = sub if os.path.isdir(sub) else path
    if not os.path.isfile(os.path.join(folder, config)):
        raise FileNotFoundError(f"{folder} has no {config}: expected a diffusers '{component}' folder "
                                f"or a checkpoint root that holds one")  # fmt: skip
    return folder


def find_scheduler(name: str) -> str | None:
    """The folder of a model's scheduler_config.json (a hub id downloads only it); None for tiny, which
    samples with CogVideoX-5B's schedule (diffusion.load_schedule(None))."""
    return None if name == "tiny" else find_component(name, "scheduler", "scheduler_config.json")


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder. The tensors are memory-mapped, not copied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if index:
        with open(os.path.join(folder, index[0])) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    tensors = {}
    for name in files:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"shard {name} listed in {index[0]} is missing from {folder}")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"cannot read {file} (truncated or corrupt safetensors file?): {err}") from None
    return tensors


def assign_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, device, dtype) -> None:
    """Fill a meta-device `model` from `state`, or raise one error naming missing, extra and misshapen keys.

    Each tensor is converted once to (device, dtype) and becomes the parameter itself (`assign=True`).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("wrong shapes", wrong)) if keys]  # fmt: skip
        raise ValueError(f"{source} does not fit this model: {'; '.join(problems)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
