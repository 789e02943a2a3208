"""
Support code for alttrain.py and eval.py: what a run needs that is not the method. Read the two scripts for
AltTrain and its evaluation; this package holds what they call, so that the tutorials stay about the paper.

  files       UserError (a mistake in the input: one clear line, no traceback), cli(), .jsonl/.csv tables with
              file:line errors, Hub datasets, atomic writes
  runs        the run folder: no silent overwrite, resume checks, checkpoints swapped in atomically, merging
  machine     CUDA or CPU, bf16 where native (--dtype), the training attention kernel, the offline SmolLM2
  memory      memory estimates from a model's config alone (weights, LoRA, activations, logits, KV cache)
  plan        the memory plan and checks built on them: refuse before loading, pick the micro-batch
  models      model aliases (with their dims and R1-Act system prompts), loading tokenizers and models
  chat        chat templates (exactly one <think>, no double BOS) and batched greedy generation
  data        the queries: SafeChain, STAR-1 or a local file, labels, selection
  sentences   first sentences, and reading an assessment sentence: does it say help or not?
  structure   the structure numbers: does the reasoning assess harm first, and what does it decide?
  judges      eval.py's judges (Qwen3Guard, Llama Guard, keywords): parse what they say, never guess
  report      eval.py's rates, bootstrap intervals, structure numbers and markdown tables
  conversations  multi-turn replay and Crescendo attacks (crescendo: the attacker's side)
  intention   intention-analysis prompting (a baseline)
  benchmarks  eval.py's benchmark loaders; tasks: answers with a right answer, scored; sandbox: running
              model-written code
  tiny        tiny random models for the tests and benchmarks
  distributed torchrun: several GPUs or CPU processes (the process group, gradients summed, answers merged)

Import what you need from its module: `from support.files import UserError`.
"""
