"""Greedy generation from plain C: examples/generate.c, compiled here with the system C compiler against
capi/l3k.h and the library the package loads, decodes a random-init Hugging Face Llama exported by
llama3_kernels.examples.export_c.write_model (float32, CPU) with a KV cache, and must give exactly the
token ids of the unpatched model's greedy generate().  A truncated model file is refused with a
message naming it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import llama3_kernels as l3k  # noqa: E402
from hf_models import make_config, make_model  # noqa: E402
from llama3_kernels.examples.export_c import write_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT_LEN, NEW_TOKENS = 5, 16


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def generate_exe(tmp_path_factory):
    """examples/generate.c built with `cc -O2 generate.c -I capi <library> -Wl,-rpath,<its folder>`.

    The program finds the library at run time by its soname (libl3k.so.<major>), which the file
    the package loads need not be called (L3K_LIBRARY may name any copy): the folder on the rpath
    holds links to it under both names."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang; or $CC) to build examples/generate.c")
    lib = Path(l3k.library_path()).resolve()
    folder = tmp_path_factory.mktemp("c_generate")
    for name in ("libl3k.so", f"libl3k.so.{l3k.__version__.split('.')[0]}"):
        (folder / name).symlink_to(lib)
    exe = folder / "l3k_generate"
    cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", str(ROOT / "examples" / "generate.c")]
    cmd += ["-I", str(ROOT / "capi"), str(folder / "libl3k.so"), f"-Wl,-rpath,{folder}", "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)} failed:\n{built.stderr}"
    return exe


def _run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def _model(name):
    # No EOS: generate() then never stops or masks a token early (min_new_tokens masks the EOS).
    # Weights drawn with std 0.2 (transformers' default 0.02 leaves the residual stream to the
    # embedding, and the tokens barely depend on the layers): with these, RoPE tables that ignore the
    # position or the llama3 scaling, or gate and up swapped, change the tokens of every prompt.
    return make_model(make_config(name, eos_token_id=None, initializer_range=0.2)).eval()


@pytest.mark.parametrize("name", ["gqa-llama3rope", "mha-odd", "mqa-odd"])
def test_c_greedy_tokens_equal_hf_generate(name, generate_exe, tmp_path):
    model = _model(name)
    path = tmp_path / "model.bin"
    write_model(model, path, model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN))
    # The mask given: generate() would otherwise take every pad_token_id in the prompt for padding.
    kw = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, PROMPT_LEN:].tolist()
    assert len(want) == NEW_TOKENS

    got = _run(generate_exe, path, ",".join(map(str, ids[0].tolist())), NEW_TOKENS)
    assert got.returncode == 0, got.stderr
    assert got.stderr == ""
    assert [int(t) for t in got.stdout.strip().split(",")] == want, f"prompt {ids[0].tolist()}"


@pytest.mark.parametrize("keep", [20, -100], ids=["inside-header", "inside-weights"])
def test_truncated_model_file_is_refused(keep, generate_exe, tmp_path):
    path = tmp_path / "model.bin"
    write_model(_model("gqa-llama3rope"), path, 32)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    got = _run(generate_exe, path, "1,2,3", 4)
    assert got.returncode != 0
    assert got.stdout == ""
    assert str(path) in got.stderr and "truncated" in got.stderr, got.stderr
