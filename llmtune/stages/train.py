"""train: LoRA on the prepared data with the transformers Trainer; writes a standard PEFT adapter."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import load_from_disk
from peft import LoftQConfig, LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data.templates import end_turns_for_servers
from llmtune.errors import InputError, Interrupted
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    partial_dir,
    read_manifest,
    require_stage,
    stage_dir,
    start_stage,
    upstream_ref,
)
from llmtune.plot import plot_metrics
from llmtune.recipe import DATA_KIND, Recipe, section_sha256
from llmtune.stages import checkpoints, distributed, objectives, trackers
from llmtune.stages.callbacks import (
    EarlyStop,
    MarkCheckpoints,
    RecordEvalBefore,
    StopOnNonFinite,
    StopOnSignal,
    TrainProgress,
)
from llmtune.stages.collate import PadCollator
from llmtune.stages.distributed import strategy_arguments
from llmtune.stages.loss import ChunkedLossTrainer, chunked_loss_supported
from llmtune.stages.sampling import GroupedTrainer


def train(recipe: Recipe, run: Path, force: bool = False, resume: bool = False) -> Outcome:
    """Train the adapter; under torchrun/accelerate launch every rank runs this, rank 0 writes."""
    prepared_dir, out_dir = stage_dir(run, "prepare"), stage_dir(run, "train")
    command = f"llmtune train {run / 'recipe.yaml'}"
    require_stage(prepared_dir, "prepare", f"llmtune prepare {run / 'recipe.yaml'}")
    device = models.pick_device()
    distributed.start(device, recipe.distributed)
    with distributed.main_first():  # converted and fingerprinted once, not once per rank
        ref = model_sources.resolve_section(recipe.model)
        ref.fingerprint
    inputs = {"prepared": upstream_ref(prepared_dir, out_dir), "base_model": ref.as_manifest()}
    recipe_sha = section_sha256(recipe, "model", "adapter", "train", "distributed")
    if not force and is_up_to_date(out_dir, "train", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)
    trackers.check_installed(recipe.train.report_to)
    check_optimizer(recipe, device)
    if recipe.train.compile and device == "cpu":
        console.print("[yellow]train: warning: train.compile on a CPU was 4.5x slower in "
                      "scripts/bench_train.py (it compiles again for each new batch length)[/yellow]")
    strategy = strategy_arguments(recipe.distributed, device, recipe.model.quantize, recipe.train.optimizer)
    notice = distributed.single_process_notice(recipe.distributed)
    if notice:
        console.print(f"train: {notice}")

    depends_on = {
        "model section": section_sha256(recipe, "model"),
        "adapter section": section_sha256(recipe, "adapter"),
        "train section": section_sha256(recipe, "train"),
        "distributed section": section_sha256(recipe, "distributed"),
        "prepared data": inputs["prepared"]["manifest_sha256"],
        "base model weights": ref.fingerprint,
    }
    _check_prepared_kind(prepared_dir, recipe.train.objective, command)  # before anything is written
    if recipe.train.objective == "grpo":
        _check_answers(recipe, prepared_dir)
    partial, state, checkpoint = distributed.share_from_main(
        lambda: _open_partial(out_dir, resume and not force, depends_on, command))

    cfg = recipe.train
    set_seed(cfg.seed)
    template = prepared_dir / "chat_template.jinja"  # the template the data was rendered with
    tokenizer = models.load_tokenizer(
        ref, template.read_text(encoding="utf-8") if template.is_file() else None)
    if template.is_file():  # the adapter's tokenizer, then the merged one, stop where turns end
        end_turns_for_servers(tokenizer, tokenizer.chat_template)
    precision = models.precision(cfg.precision, device)
    if precision == "fp16" and device != "cuda":
        console.print("train: fp16 with loss scaling on the CPU (what pre-Ampere GPUs run); "
                      "bf16 or fp32 are the CPU's own choices")
    distributed.prepare_sharded_loading(strategy)
    model = _adapter_model(recipe, ref, precision)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(
        f"train: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), device {device}, precision {precision}"
        + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
        + (f", base quantized {recipe.model.quantize}" if recipe.model.quantize != "none" else "")
        + (f", {distributed.world_size()} processes ({recipe.distributed.strategy})"
           if distributed.world_size() > 1 else "")
    )

    objective = cfg.objective
    train_set = load_from_disk(str(prepared_dir / "train"))
    if objective == "kto":  # TRL's KTO reads its batches in order: shuffled once, by the seed
        train_set = train_set.shuffle(seed=cfg.seed).flatten_indices()
    elif cfg.group_by_length and objective != "grpo":
        # the sampler reads lengths from this column instead of decoding every row
        train_set = train_set.add_column("length", pc.list_value_length(train_set.data.column("input_ids")).to_pylist()
                                         if objective == "sft" else objectives.lengths(train_set))
    validation = load_from_disk(str(prepared_dir / "validation"))
    # GRPO's evaluation would sample completions for every validation prompt at each eval: the
    # rewards on held-out prompts are `llmtune eval`'s
    validation = validation.remove_columns("sample") if len(validation) and objective != "grpo" else None
    if validation is not None and objective not in ("sft", "kto") and cfg.group_by_length:
        validation = validation.add_column("length", objectives.lengths(validation))  # as the Trainer groups it
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = PadCollator(pad_id) if objective == "sft" else objectives.collator(objective, pad_id)
    progress = TrainProgress(partial / "metrics.jsonl", collator)
    stop = StopOnSignal()
    callbacks = [progress, stop, MarkCheckpoints(partial / checkpoints.CHECKPOINTS, cfg.keep_checkpoints),
                 RecordEvalBefore(partial, state),
                 StopOnNonFinite(collator, precision, partial / checkpoints.CHECKPOINTS)]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStop(cfg.early_stopping_patience))
    if objective == "sft":
        chunked = cfg.loss == "chunked" or (cfg.loss == "auto" and chunked_loss_supported(model.config))
        console.print(f"train: loss {'chunked (no full logits)' if chunked else 'standard'}")
        trainer_class = ChunkedLossTrainer if chunked else GroupedTrainer
    else:
        trainer_class = objectives.trainer_class(objective)
        with_reference = objective in ("dpo", "kto") or (objective == "grpo" and cfg.grpo.beta)
        reference = ("the base with the adapter disabled" if with_reference
                     else "none (grpo.beta is 0)" if objective == "grpo" else "none (the objective needs none)")
        console.print(f"train: objective {objective} (TRL's {objectives.TRL_CLASSES[objective][1]}), "
                      f"reference model: {reference}")
    with trackers.tracker_environment(cfg.report_to, run, recipe.name):
        trainer, result = _run_trainer(
            trainer_class, recipe, model, train_set, validation, collator, tokenizer,
            callbacks, partial, device, precision, state, checkpoint, stop, strategy)
    if stop.stopped:
        if distributed.is_main():  # `llmtune launch` reads this to tell "interrupted" from a crash
            checkpoints.write_resume_state(partial, {**state, "interrupted_at_step": trainer.state.global_step})
        distributed.barrier()
        raise Interrupted(
            f"training interrupted at step {trainer.state.global_step}; a checkpoint was saved "
            f"in {partial / checkpoints.CHECKPOINTS}",
            hint=f"resume with: {command} --resume auto",
        )
    if recipe.distributed.strategy == "fsdp" and distributed.world_size() > 1:
        console.print(f"train: FSDP2 sharded {distributed.sharded_parameters(trainer.model_wrapped)} "
                      f"parameter tensors across {distributed.world_size()} processes")
    eval_after, eval_rewards = _evaluate(trainer, "after training")
    # FSDP and ZeRO-3 shard the weights: every rank takes part in gathering the trained ones
    state_dict = distributed.trainable_state_dict(trainer)
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has written the adapter and its manifest
        return Outcome(read_manifest(out_dir), up_to_date=False)

    model.save_pretrained(str(partial), state_dict=state_dict)
    tokenizer.save_pretrained(str(partial))
    (partial / checkpoints.RESUME_STATE).unlink()
    summary = {
        "steps": result.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": round(result.training_loss, 5),
        "eval_loss_before": state.get("eval_loss_before"),
        "eval_loss": eval_after,
        **eval_rewards,  # preference objectives: eval_reward_margin, eval_reward_accuracy
        "objective": cfg.objective,
        "trainable_params": trainable,
        "total_params": total,
        # the compute dtype (and of the frozen weights): inference on this adapter uses it too
        "precision": precision,
        # merge compares the float merge with the quantized base + adapter that was trained
        "base_quantization": {"quantize": recipe.model.quantize,
                              "double_quant": recipe.model.double_quant,
                              "compute_dtype": recipe.model.compute_dtype},
        "train_seconds": round(progress.seconds, 1),
        "resumed_from_step": checkpoints.step_of(checkpoint) if checkpoint else None,
        "tokens_per_second": round(progress.tokens / progress.seconds, 1) if progress.seconds else None,
        "trained_tokens_per_second": (round(progress.trained_tokens / progress.seconds, 1)
                                      if progress.seconds else None),
    }
    manifest = finish_stage(partial, out_dir, stage="train", recipe_sha256=recipe_sha,
                            inputs=inputs, summary=summary, device=device)
    try:
        plot_metrics(out_dir / "metrics.jsonl", run / "training_curves.png")
        console.print(f"train: training curves -> {run / 'training_curves.png'}")
    except InputError as missing:  # the adapter is written: a missing plotting library costs the PNG only
        console.print(f"train: no training curves: {missing.message} ({missing.hint})")
    distributed.barrier()
    return Outcome(manifest, up_to_date=False)


def _open_partial(out_dir: Path, resume: bool, depends_on: dict, command: str):
    """`<adapter>.partial/` to train into: (folder, resume state, checkpoint to resume from)."""
    partial, checkpoint = partial_dir(out_dir), None
    state = checkpoints.read_resume_state(partial) if resume else None
    if state is not None:
        checkpoints.check_same_run(state["depends_on"], depends_on, command)
        checkpoint = checkpoints.newest_good(partial / checkpoints.CHECKPOINTS)
    if checkpoint is None:
        if resume:
            console.print("train: no good checkpoint to resume from; starting from the beginning")
        partial = start_stage(out_dir)
        state = {"depends_on": depends_on}
    else:
        console.print(f"train: resuming from {checkpoint}")
        checkpoints.discard_after(partial / checkpoints.CHECKPOINTS, checkpoints.step_of(checkpoint))
        _drop_metrics_after(partial / "metrics.jsonl", checkpoints.step_of(checkpoint))
        state.pop("interrupted_at_step", None)
    checkpoints.write_resume_state(partial, state)
    return partial, state, checkpoint


def _adapter_model(recipe: Recipe, ref, precision: str):
    """The base (quantized for QLoRA), frozen weights in the compute dtype, with a fresh
    LoRA/DoRA adapter on it."""
    quantize = recipe.model.quantize
    sharded = distributed.shards(recipe.distributed)  # FSDP and DeepSpeed place the weights themselves
    base = models.load_model(ref, precision, quantize=quantize, double_quant=recipe.model.double_quant,
                             compute_dtype=recipe.model.compute_dtype,
                             shardable=distributed.shards_quantized_weights(recipe.distributed, quantize),
                             device=None if sharded else "local")
    # With a cache, transformers does not read packed position ids as sequence boundaries, and
    # packed examples would attend to each other; training never uses the cache anyway.
    # (GRPO generates its completions: there the cache is what makes generation fast.)
    base.config.use_cache = recipe.train.objective == "grpo"
    if quantize != "none":
        _keep_4bit_weights_trainable(base)
    # QLoRA needs nothing more: the Trainer enables gradient checkpointing (non-reentrant, so
    # inputs need not require grads). peft's prepare_model_for_kbit_training would also cast
    # every weight it does not quantize (embeddings, output head, norms) to fp32: for an 8B
    # Llama 3 that is 2.1 GB more, for stability that bf16 autocast does not need.
    try:
        model = get_peft_model(base, lora_config(recipe, base))
    except ValueError as exc:  # peft names the modules it could not find
        raise InputError(f"adapter: {exc}", hint="check adapter.target_modules against the model's "
                         "module names, or use target_modules: all-linear") from None
    _trainable_in_fp32(model)
    # Where a PEFT loader looks for the base: the hub id, or the local folder we trained on.
    model.peft_config["default"].base_model_name_or_path = (
        ref.source if ref.kind == "hub" else str(ref.local_dir))
    if precision in ("bf16", "fp16") and recipe.train.objective != "grpo":
        # (GRPO generates outside autocast: there peft's cast is what makes the dtypes meet.)
        # The Trainer runs every forward under autocast (accelerate wraps it), where a matmul
        # takes mixed dtypes; peft's cast of each LoRA input to the adapter's fp32 then only
        # makes fp32 copies of the activations. Off: SmolLM2 on 64 GSM8K chats peaked at
        # 2.1-2.2 GB of RSS instead of 2.6-3.2 GB, and trained as fast or faster (bench_train).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def _trainable_in_fp32(model) -> None:
    """Every trained parameter in fp32, whatever the frozen weights' dtype. peft upcasts its
    adapter layers only: modules_to_save copies (embed_tokens, lm_head) keep the base's 16-bit
    dtype and would train as pure bf16, or under fp16 stop the loss scaler at the first step
    ("Attempting to unscale FP16 gradients"). The optimizer then holds fp32 master weights for
    all of them, and autocast computes in 16 bits. Outside autocast (GRPO generates there) such
    a module takes and gives the frozen dtype, as before."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if not own:
            continue
        frozen_dtype = own[0].dtype
        for param in own:
            param.data = param.data.float()
        module.register_forward_pre_hook(_inputs_to_fp32_outside_autocast)
        module.register_forward_hook(functools.partial(_output_to_outside_autocast, frozen_dtype))


def _autocasting(module) -> bool:
    return torch.is_autocast_enabled(next(module.parameters()).device.type)


def _inputs_to_fp32_outside_autocast(module, args):
    if _autocasting(module):
        return None
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_outside_autocast(dtype, module, args, output):
    if _autocasting(module) or not torch.is_tensor(output) or not output.is_floating_point():
        return None
    return output.to(dtype)


def _keep_4bit_weights_trainable(model) -> None:
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a 4-bit layer's weights for a
    faster kernel the first time the layer runs in eval mode, and that kernel has no backward:
    training after an evaluation (the loss before training) then got gradients 133% off through
    every 4-bit layer (SmolLM2, measured; tests/test_train.py). Never repack a model in training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _drop_metrics_after(path: Path, step: int) -> None:
    """Resuming repeats the steps after the checkpoint: forget what they logged."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


def lora_config(recipe: Recipe, model=None) -> LoraConfig:
    """The peft LoraConfig for the recipe's adapter section (plan builds the same on the meta
    device). peft takes layers_to_transform only with a list of module names: with all-linear,
    the names of `model`'s linear layers but the output head are listed."""
    adapter = recipe.adapter
    extra = {}
    targets = adapter.target_modules
    if adapter.layers_to_transform is not None and targets == "all-linear" and model is not None:
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")})
    if adapter.init == "loftq":
        if recipe.model.quantize != "none":
            raise InputError("adapter.init: loftq quantizes the base itself; use it with model.quantize: none")
        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        layers_to_transform=adapter.layers_to_transform,
        rank_pattern=dict(adapter.rank_pattern),
        alpha_pattern=dict(adapter.alpha_pattern),
        lora_dropout=adapter.dropout,
        target_modules=targets,
        modules_to_save=adapter.modules_to_save or None,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.rslora,
        init_lora_weights=_INIT[adapter.init],
        task_type="CAUSAL_LM",
        **extra,
    )


def _run_trainer(trainer_class, recipe: Recipe, model, train_set, validation, collator, tokenizer,
                 callbacks, partial: Path, device: str, precision: str, state: dict, checkpoint,
                 stop: StopOnSignal, strategy: dict):
    """Build the Trainer and train (trackers' callbacks read their settings when it is built)."""
    objective = recipe.train.objective
    arguments = _training_arguments(recipe, partial / checkpoints.CHECKPOINTS, device, precision,
                                    validation is not None, "eval_loss_before" not in state, strategy)
    extra = {"data_collator": collator}
    if objective == "grpo":  # GRPO batches its prompts itself, and scores them with the rewards
        extra = {"reward_funcs": objectives.reward_functions(recipe)}
    if objective != "sft":
        arguments = objectives.config(objective, recipe, arguments)
        extra["processing_class"] = tokenizer
    else:
        arguments = TrainingArguments(**arguments)
    distributed.one_gpu_per_process(arguments)
    trainer = trainer_class(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=validation,
        callbacks=callbacks,
        **extra,
    )
    if objective == "grpo":
        trainer.counts = collator
    trainer.loraplus_lr_ratio = recipe.adapter.loraplus_lr_ratio  # the optimizer is made in train()
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stop.uninstall()
    return trainer, result


# train.optimizer -> transformers' `optim`: each from the library that implements it.
OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "adafactor": "adafactor", "sgd": "sgd", "lion_8bit": "lion_8bit"}


def check_optimizer(recipe: Recipe, device: str) -> None:
    """Refuse what the device cannot run, before the model is loaded."""
    if recipe.train.optimizer.startswith("paged_") and device != "cuda":
        raise InputError(f"train.optimizer: {recipe.train.optimizer} pages optimizer state between a CUDA "
                         f"GPU and CPU memory; this device is {device}",
                         hint="use adamw_8bit for the same 8-bit states without paging")


def _training_arguments(recipe: Recipe, output_dir: Path, device: str, precision: str, has_eval: bool,
                        eval_before: bool, strategy: dict) -> dict:
    """transformers' TrainingArguments for the recipe, as keyword arguments (TRL's configs take
    the same, and the objective's own besides)."""
    cfg = recipe.train
    periodic_eval = has_eval and cfg.eval_every is not None
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        optim=OPTIMIZERS[cfg.optimizer],
        neftune_noise_alpha=cfg.neftune_alpha,
        torch_compile=cfg.compile,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.log_every,
        logging_strategy="steps",
        # A NaN loss is reported as such (StopOnNonFinite stops there), never replaced by the
        # average of earlier ones, which the Trainer does by default.
        logging_nan_inf_filter=False,
        # Checkpoints every save_every steps (and on SIGTERM/SIGINT); MarkCheckpoints rotates
        # them itself, after marking, so rotation can never remove the last good one.
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        save_total_limit=None,
        eval_strategy="steps" if periodic_eval else "no",
        # The loss before training, evaluated inside train(): a Trainer that evaluates before
        # train() marks the model prepared, and then never wraps it in DDP (transformers 5.23).
        eval_on_start=has_eval and eval_before,
        eval_steps=cfg.eval_every if periodic_eval else None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        report_to=list(cfg.report_to) or "none",
        run_name=recipe.name,
        prediction_loss_only=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        **strategy,  # DDP, FSDP or DeepSpeed settings (stages/distributed.py)
    )


def _check_prepared_kind(prepared_dir: Path, objective: str, command: str) -> None:
    """Refuse a prepared set of another kind than the objective trains on."""
    kind = read_manifest(prepared_dir)["summary"].get("kind", "sft")
    wanted = DATA_KIND[objective]
    if kind != wanted:
        raise InputError(f"{prepared_dir} holds {kind} data, but train.objective {objective} trains on {wanted} data",
                         hint=f"prepare it again for this recipe: {command.replace('train', 'prepare', 1)} --force")


def _check_answers(recipe: Recipe, prepared_dir: Path) -> None:
    """Refuse, before the model loads, rewards that compare with an answer on prompts without one."""
    from llmtune.rewards import needs_answer

    missing = read_manifest(prepared_dir)["summary"].get("without_answer", 0)
    comparing = needs_answer(recipe.rewards)
    if missing and comparing:
        raise InputError(f"{missing} prompts in {prepared_dir} have no answer, and the reward(s) "
                         f"{', '.join(comparing)} compare the completion with the row's answer",
                         hint="give every row an answer (data fields: {answer: COLUMN}), or drop the match reward")


def _evaluate(trainer: Trainer, when: str) -> tuple[float | None, dict]:
    """The eval loss, and a preference objective's reward margin and accuracy on the validation set."""
    if trainer.eval_dataset is None:
        return None, {}
    metrics = trainer.evaluate()
    loss = round(metrics["eval_loss"], 5)
    rewards = [f"{label} {metrics[key]:.3f}" for key, label in
               (("eval_rewards/margins", "margin"), ("eval_rewards/accuracies", "accuracy")) if key in metrics]
    if trainer.args.__class__ is not TrainingArguments:  # a preference objective's loss is no perplexity
        console.print(f"train: eval loss {when}: {loss:.4f}" + "".join(f", {r}" for r in rewards))
    else:
        console.print(f"train: eval loss {when}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    names = {"eval_rewards/margins": "eval_reward_margin", "eval_rewards/accuracies": "eval_reward_accuracy"}
    return loss, {name: round(metrics[key], 5) for key, name in names.items() if key in metrics}
