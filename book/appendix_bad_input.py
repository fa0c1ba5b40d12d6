# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bad input: what minisd says
#
# **You will build** nothing new on this page: it lists the bad inputs `minisd` handles, each with
# the call that gives it and the message that comes back, grouped as files, arguments, prompts and
# devices. Every message below is printed by running the call in this notebook; the calls are the
# rows of `tests/bad_input_cases.py`, which `tests/test_bad_input.py` runs too, so the page and the
# tests read one table and cannot drift apart.
#
# Three rules hold for every error below. It comes **before any work** that depends on the bad
# input (a bad argument is refused before the text encoder runs, a bad `--out` before the model
# loads, a broken file before a model is built from it). It **names the argument or the file** and
# says what to do. And it is `minisd`'s own: a `ValueError` or `TypeError` for arguments, a
# `minisd.weights.WeightsError` (a `ValueError`) for weight files, never an exception from inside
# torch, safetensors, zipfile or pickle, and never torch's advice to unpickle a file with
# `weights_only=False`.

# %%
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

import minisd
from minisd import StableDiffusion

sys.path.insert(0, str(Path(minisd.__file__).resolve().parent.parent / "tests"))
from bad_input_cases import CASES, GROUPS, run  # noqa: E402  (the table the tests run)

os.chdir(tempfile.mkdtemp())         # a scratch folder; the files below are made in ./bad-input
folder = Path("bad-input")
folder.mkdir()
pipe = StableDiffusion.course_model()
print(len(CASES), "cases in", len(GROUPS), "groups:", {g: sum(c["group"] == g for c in CASES) for g in GROUPS})


def show(group):
    """Run every case of `group` and print the input, the call and what came back."""
    for case in (c for c in CASES if c["group"] == group):
        print("●", case["input"])
        print("  >>>", case["call"])
        if case.get("unless") and eval(case["unless"], {"torch": torch}):
            print(f"  (not a bad input on this machine: {case['unless']})\n")
            continue
        kind, message, _ = run(case, folder, pipe)
        assert kind == case["raises"] and all(w in message for w in case["words"]), (kind, message)
        for i, line in enumerate(f"{kind}: {message}".splitlines()):
            print(textwrap.fill(line, width=96, initial_indent="  " if i == 0 else "    ", subsequent_indent="    ",
                                break_on_hyphens=False))
        print()


# %% [markdown]
# ## Files
#
# Weight files go wrong in a handful of ways: a clone made without git-lfs holds ~130-byte text
# pointers where the weights should be; a download stops half-way; a file is of another format
# than its name says, or is the right format for another loader (a LoRA given as a checkpoint);
# a diffusers folder lacks a part or holds a broken `config.json`. Each gets a `WeightsError` that
# names the file.

# %%
show("files")

# %% [markdown]
# ## Arguments
#
# A pipeline call checks all its arguments before the text encoder runs: a bad sampler, size,
# seed or output type is refused up front, not after a minute of sampling. The command line
# (`python -m minisd generate`) checks `--out` before it loads a model, prints `error: ...` and
# exits with 1, without a traceback; it writes the image atomically, so an interrupted run leaves
# no half-written PNG.

# %%
show("arguments")

# %% [markdown]
# ## Prompts
#
# A prompt is a `str` or a list of them. The one input that is not an error: a prompt longer than
# CLIP's 77 positions is cut to its first 75 tokens, as in diffusers, with a warning that says
# how many tokens were dropped and which.

# %%
show("prompts")

# %% [markdown]
# ## Devices
#
# A device this torch cannot use, or a dtype the device cannot run, is refused when the model is
# loaded. On a Mac where `torch.backends.mps.is_available()`, `device="mps"` is accepted and the
# course model is meant to run there in float32; no test of this course has run it on a Mac (the
# tests run on Linux, where the row below is the refusal).

# %%
show("devices")
scratch = Path.cwd()
os.chdir(Path(minisd.__file__).resolve().parent.parent / "book")   # back, and the scratch files away
shutil.rmtree(scratch)

# %% [markdown]
# ## Beyond the table: property-based tests
#
# The rows above are single inputs. Three suites (`tests/test_properties_*.py`, with
# [hypothesis](https://hypothesis.readthedocs.io)) check the same rules over many drawn inputs,
# from a fixed seed so that every run tries the same ones (the numbers of examples are set in
# `tests/conftest.py`):
#
# - **the pipeline's arguments**: prompts of every type (lists, tuples, empty, `None`, numbers,
#   bytes), sizes (negative, zero, not a multiple of the VAE's factor, `nan`, `inf`), steps,
#   guidance (`nan`, `inf`, negative, complex, strings), seeds (floats, beyond 64 bits), samplers,
#   output types and initial latents, one at a time and all at once; devices and dtypes; and
#   img2img's image and strength. Each call either runs or raises a `ValueError`/`TypeError` from
#   `minisd` whose message names the argument.
# - **the tokenizer** on arbitrary Unicode text (every script, combining marks, emoji, control
#   characters, very long input): the same ids as transformers' `CLIPTokenizer`. The one class
#   excluded is characters newer than the running Python's Unicode database, which transformers'
#   Rust tokenizer classifies with newer tables (the test module's docstring has the example).
# - **every loader** (single files, diffusers folders, course checkpoints, LoRA files) on random
#   bytes, files cut at any byte, files of the wrong format, and folders with a part missing,
#   swapped, corrupt or taken from another model family: always a `WeightsError` naming the file.
#
# ## What you built
#
# A map of the edges: for each bad input a user is likely to give `minisd` (weights files and
# folders, pipeline arguments, prompts, devices) the call and the message, printed by running it.
# The table lives in `tests/bad_input_cases.py`; a new case is one row there, and both this page
# and `tests/test_bad_input.py` pick it up.
