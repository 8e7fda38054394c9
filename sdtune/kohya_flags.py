"""kohya-ss sd-scripts' training flags (`train_network.py`) and what `sdtune train` takes in their place.

The CLI adds the entry to its "No such option" error, where click's own guess would be a near spelling (kohya's
`--max_train_steps` is closest to `--max-timestep`); the README's "Coming from kohya-ss" table lists the same rows,
and a test keeps the two alike.
"""

from __future__ import annotations

# kohya-ss flag -> what sdtune takes, its first word the sdtune flag (or "nothing"); only what sdtune has, and only
# flags that sdtune spells otherwise (kohya-ss' --seed is sdtune's too)
KOHYA_FLAGS: dict[str, str] = {
    "--pretrained_model_name_or_path": "--model",
    "--train_data_dir": "--images, given the N_name folder itself (its repeats are not read: --steps sets the length)",
    "--reg_data_dir": "--class-images, given the N_class folder itself, with --class-prompt",
    "--dataset_config": "--config, a TOML file of sdtune's own settings (one --images per --concept)",
    "--output_dir": "--output, the run folder",
    "--output_name": "--output of `sdtune export --format kohya`, whose file name is its ss_output_name",
    "--network_module": "--method (`sdtune methods` lists them)",
    "--network_dim": "--rank",
    "--network_alpha": "--alpha (default: the rank; kohya-ss' is 1)",
    "--network_args": "--targets (conv_dim: a family with convolutions), --conv-rank and --conv-alpha (conv_dim, conv_alpha; "
                      "default: --rank, --alpha), --rank-dropout, --module-dropout",
    "--network_dropout": "--lora-dropout (peft's: it drops the layer's input, kohya-ss' the r features after lora_down)",
    "--network_weights": "--init-weights (rank, alpha, conv rank and alpha, and layers come from the file)",
    "--dim_from_weights": "--init-weights, which takes rank and alpha (and the 3x3 convs' own) from the file",
    "--base_weights": "--base-adapters FILE:STRENGTH",
    "--base_weights_multiplier": "--base-adapters FILE:STRENGTH",
    "--network_train_unet_only": "nothing: the text encoder is trained only with --train-text-encoder",
    "--learning_rate": "--lr",
    "--unet_lr": "--lr",
    "--text_encoder_lr": "--text-encoder-lr, with --train-text-encoder",
    "--max_train_steps": "--steps",
    "--max_train_epochs": "--steps (the dry run says how many epochs they make)",
    "--train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--gradient-accumulation-steps",
    "--lr_scheduler": "--lr-scheduler",
    "--lr_warmup_steps": "--lr-warmup-steps (a number of steps, not a ratio)",
    "--lr_scheduler_num_cycles": "--lr-cycles",
    "--optimizer_type": "--optimizer (adamw8bit, prodigy, ...)",
    "--optimizer_args": "--weight-decay, --adam-beta1, --adam-beta2, --adam-epsilon, --prodigy-d-coef, --prodigy-d0",
    "--mixed_precision": "--mixed-precision",
    "--save_precision": "--dtype of `sdtune export`",
    "--save_every_n_steps": "--save-every (each save kept as adapter-step-N.safetensors) or --checkpoint-every (to resume from)",
    "--save_last_n_steps": "--keep-saves K, a count of saves: N / --save-every",
    "--save_every_n_epochs": "--save-every, in steps",
    "--save_state": "--checkpoint-every",
    "--enable_bucket": "--buckets",
    "--flip_aug": "--random-flip",
    "--caption_extension": "nothing: IMG.txt, else IMG.caption, is read",
    "--enable_wildcard": "nothing: a caption file's lines are always read as variants, one drawn each time",
    "--shuffle_caption": "--shuffle-caption",
    "--keep_tokens": "--keep-tokens",
    "--caption_dropout_rate": "--caption-dropout",
    "--caption_tag_dropout_rate": "--caption-tag-dropout",
    "--min_snr_gamma": "--snr-gamma",
    "--noise_offset": "--noise-offset",
    "--multires_noise_iterations": "--multires-noise-iterations",
    "--multires_noise_discount": "--multires-noise-discount",
    "--ip_noise_gamma": "--input-perturbation",
    "--debiased_estimation_loss": "--debiased-estimation",
    "--zero_terminal_snr": "--zero-terminal-snr",
    "--clip_skip": "--clip-skip",
    "--max_token_length": "--max-token-length",
    "--prior_loss_weight": "--prior-loss-weight",
    "--max_grad_norm": "--max-grad-norm (default 0, no clipping; kohya-ss' is 1)",
    "--min_timestep": "--min-timestep",
    "--max_timestep": "--max-timestep",
    "--loss_type": "--loss-type",
    "--huber_c": "--huber-c",
    "--huber_schedule": "--huber-schedule",
    "--masked_loss": "--masked-loss",
    "--alpha_mask": "--masked-loss --mask-source alpha",
    "--gradient_checkpointing": "--gradient-checkpointing",
    "--cache_latents": "nothing: latents are cached unless --no-cache-latents",
    "--no_half_vae": "--no-half-vae",
    "--sample_prompts": "--validation-prompts (a line's --w, --h, --d, --s, --l, --n are read)",
    "--sample_every_n_steps": "--validate-every",
    "--validate_every_n_steps": "--validate-every, which also measures the validation loss",
    "--validation_split": "--validation-images, a number of images held out, not a share",
    "--log_with": "--log-with",
    "--xformers": "nothing: PyTorch's fused attention is used",
    "--sdpa": "nothing: PyTorch's fused attention is used",
    "--v2": "nothing: it is read from the model's config",
    "--v_parameterization": "nothing: it is read from the model's scheduler config",
}


def kohya_flag_hint(flag: str) -> str | None:
    """What sdtune takes in place of kohya-ss' `flag` (as typed, `--network_dim` or `--network-dim`), or None."""
    spelled = "--" + flag.removeprefix("--").replace("-", "_")
    instead = KOHYA_FLAGS.get(spelled)
    return None if instead is None else f"for kohya-ss' {spelled}, sdtune takes {instead} (the README's \"Coming from kohya-ss\")"


# the tables of a kohya-ss dataset config (`--dataset_config`), which a TOML of sdtune settings never holds
KOHYA_DATASET_TABLES = frozenset({"general", "datasets"})


def kohya_settings_hint(names: list[str]) -> str:
    """For unknown setting names of which some are kohya-ss' (a kohya-ss config file's keys, `network_dim`): what
    sdtune takes for each, as '; kohya-ss' network_dim is --rank, ...'; '' where none is."""
    taken = [f"{name} {KOHYA_FLAGS['--' + name].split()[0].rstrip(',:')}" for name in names if "--" + name in KOHYA_FLAGS]
    parts = []
    if KOHYA_DATASET_TABLES & set(names):
        parts.append("a kohya-ss dataset config is not read: give its image folders as --images and --class-images")
    if taken:
        parts.append(f"kohya-ss' {taken[0].replace(' ', ' is ', 1)}{''.join(', ' + name for name in taken[1:])}")
    return f"; {'; '.join(parts)} (the README's \"Coming from kohya-ss\")" if parts else ""
