"""End-to-end MiSS demo: fine-tune a causal LM with miss_ext, compare with PEFT, merge, save.

    python -m miss_ext.demo                                   # random Llama, synthetic task, no downloads
    python -m miss_ext.demo --model DIR --data FILE           # your local HF model folder and text
    python -m miss_ext.demo --help

By default, with no downloads:
1. builds a small LlamaForCausalLM from a config (random, seeded init) and freezes all of it;
2. fine-tunes only MiSS blocks on q/k/v/o/gate/up/down_proj (`miss_ext.apply_miss`) on a
   synthetic task: every sequence counts modulo the vocabulary size from a random start with a
   random step, so after two tokens the rest is predictable and the loss falls far below ln(V);
3. runs the same steps with PEFT's plain-PyTorch MiSS (same base, init, data and seed) and prints
   a table of step time and memory, and the held-out loss and perplexity before and after;
4. checks that the merged model (`miss_ext.merge_and_unload`) gives the unmerged logits, saves the
   adapter in PEFT's format (`miss_ext.save_adapter`) and the frozen base beside it, and plots
   the loss curves. The exit code is 1 when the merge check fails.

With --model DIR --data FILE it does the same on a local Hugging Face causal-LM folder (loaded
with local_files_only=True) and a text or JSONL file, tokenised with the model's tokenizer and
packed into --seq-len sequences, the last --heldout share (at least one) held out; the adapter's
base_model_name_or_path is DIR (see _user.py). --target-modules chooses the layers (all-linear by
default there).

A second demo, `python -m miss_ext.demo.mixed` (mixed.py), trains two adapters on two tasks in
the same batches and generates for both in one mixed batch (miss_ext.load_bank, mixed_batch).

Modules: _cli (flags and their checks), _synthetic (random Llama, counting task), _user (model
folder and text file), _training (variants, steps, held-out loss, memory), _report (table, plot),
_merge (merge check), _driver (run_demo, main).
"""
from ._cli import (DTYPES, HELDOUT_FRACTION, SIZES, TARGET_MODULES, ModelDims, build_parser, cuda_kernels_built,
                   model_dims, parse_args, parse_target_modules, resolve_device, target_modules, user_mode,
                   validate)
from ._driver import DemoResult, Prepared, main, prepare_synthetic, prepare_user, run_demo, \
    torch_threads
from ._merge import BF16_NOISE_FACTOR, MERGE_RTOL_FP32, MergeCheck, check_merge, logits_of, merge_tolerance
from ._report import MIB, format_heldout, format_table, plot_losses, print_where
from ._batches import TokenBatches
from ._synthetic import MAX_STRIDE, VOCAB, build_base_model, loss_floor, make_batches
from ._training import (WARMUP_STEPS, HeldoutLoss, RunResult, apply_miss_ext, apply_peft, causal_lm_loss,
                        heldout_loss, save_base_model, saved_activation_bytes, timed_step, train, train_step,
                        trainable_parameters)
from ._user import (DemoInputError, TextData, check_fits, check_model_dir, load_model, load_text_data,
                    load_tokenizer, pack_and_split, read_documents, tokenize, training_batches)
