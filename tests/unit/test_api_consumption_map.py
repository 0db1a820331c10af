"""The API's consumption map: every leaf field and every enum value of FineTuneJobSpec, with its evidence.

A manifest either runs as written or is refused before any pod exists (issue 13). For each leaf of
``spec`` (walked through nested models, lists of models and optionals) and for each value of each
enum, CONSUMPTION names one of:

- a test that shows its effect: ``tests/<path>.py::test_name``, or ``...::test_name[id]`` for one
  case of a parametrized test (for a field that only says where something lives, a test that runs
  with it set and checks that it was used);
- the admission refusal that keeps it out: ``refused: <id>``, a row of ``INVALID`` in
  tests/unit/test_api_validation.py (``finetune validate``), which tests/e2e/test_e2e_crd.py replays
  against the real API server.

The values of a field that selects the code that runs (``task.type``, ``method.type``,
``data.format``) are shown by a run of that value that trains and writes its outputs; parameters are
shown only by a test that would notice them being ignored.

What has neither is in UNPROVEN, with the reason. UNPROVEN only shrinks: a field that gets its test
moves to CONSUMPTION and UNPROVEN_COUNT goes down; a new field of the API comes with its evidence.

Paths are camelCase from ``spec``; list items are ``[]`` (``spec.resources.env[].name``); an enum
value is ``path=value`` (``spec.method.type=qlora``). A field that is a dict (node selector, labels,
affinity) is one leaf.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from finetune_operator.api.tasks import TaskType
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from pydantic import BaseModel
from test_api_validation import INVALID

REPO = Path(__file__).resolve().parents[2]
REFUSED = "refused: "


def refused(row: str) -> str:
    """Evidence that is an admission refusal: the id of an INVALID row of test_api_validation.py."""
    return REFUSED + row


# The tests the map names (a parametrized one takes its case id in brackets).
METHOD_PARAMS = "tests/trainer/test_method_params.py"
ADALORA_SCHEDULE = f"{METHOD_PARAMS}::test_adalora_budget_follows_the_schedule"
ADALORA_WEIGHTS = f"{METHOD_PARAMS}::test_adalora_importance_and_orthogonality_weights"
FREEZE = f"{METHOD_PARAMS}::test_freeze_trains_exactly_what_it_leaves"
IA3 = f"{METHOD_PARAMS}::test_ia3_rescales_the_modules_it_names"
LORA_BIAS = f"{METHOD_PARAMS}::test_lora_bias_trains_and_saves_the_biases_it_names"
LORA_SCALING = f"{METHOD_PARAMS}::test_lora_scaling_and_dora_magnitudes"
MODULES_TO_SAVE = f"{METHOD_PARAMS}::test_lora_modules_to_save_are_trained_copies_saved_with_the_adapter"
PROMPT_INIT = f"{METHOD_PARAMS}::test_prompt_init_text_initialises_the_soft_prompt"
QUANTIZATION = f"{METHOD_PARAMS}::test_quantization_reaches_every_4bit_layer"
VIRTUAL_TOKENS = f"{METHOD_PARAMS}::test_virtual_tokens_are_trained_and_saved"
DATA_OPTIONS = "tests/trainer/test_data_options.py"
DIVERGENCE = "tests/trainer/test_divergence.py"
GENERATION = "tests/trainer/test_generation_metrics.py"
GENERATION_RUN = f"{GENERATION}::test_two_ranks_report_the_metrics_of_one_process_and_the_samples_go_with_the_outputs"
GENERATION_EARLY_STOP = (
    f"{GENERATION}::test_early_stopping_on_a_generation_metric_ranks_checkpoints_by_it_higher_is_better"
)
ROLLBACK = f"{DIVERGENCE}::test_a_loss_spike_rolls_back_to_the_checkpoint_before_it_with_half_the_learning_rate"
DIVERGENCE_FAILS = f"{DIVERGENCE}::test_with_fail_a_spike_ends_the_job_keeping_every_checkpoint"
ROLLBACKS_USED = f"{DIVERGENCE}::test_a_nonfinite_loss_rolls_back_until_the_rollbacks_allowed_are_used"
AUGMENTATION = "tests/trainer/test_augmentation.py"
AUGMENTED_COPIES = f"{AUGMENTATION}::test_eda_copies_are_seeded_counted_tagged_and_leave_eval_and_targets_alone"
BACK_TRANSLATION = f"{AUGMENTATION}::test_back_translation_runs_both_models"
ALPHA = f"{AUGMENTATION}::test_alpha_sets_how_much_changes"
MINED = "tests/trainer/test_vocabulary.py::test_mining_picks_the_frequent_words_split_into_many_pieces"
MINED_CORPUS = "tests/trainer/test_vocabulary.py::test_a_corpus_of_its_own_is_mined_and_its_defects_named"
MINED_FILE_TYPE = (
    "tests/trainer/test_vocabulary.py::test_the_corpus_is_read_as_its_declared_file_type_up_to_max_samples"
)
STALL_RESTART = "tests/unit/test_reconcile.py::test_a_gang_quiet_past_the_stall_timeout_restarts_from_its_checkpoint"
PREFERENCE_COLUMNS = "tests/trainer/test_preference_data.py::test_mapped_columns_are_read"
COLUMNS_READ = f"{DATA_OPTIONS}::test_renamed_columns_are_read"
FILE_TYPE = f"{DATA_OPTIONS}::test_a_declared_file_type_wins_over_the_extension"
MAX_SAMPLES = f"{DATA_OPTIONS}::test_max_samples_limits_the_records_read"
FORGETTING = "tests/trainer/test_forgetting.py"
FORGETTING_SOURCES = f"{FORGETTING}::test_replay_and_fisher_sources_are_read_as_declared"
EWC_RUN = f"{FORGETTING}::test_ewc_moves_the_parameters_less_and_forgets_less"
REPLAY_RUN = f"{FORGETTING}::test_replay_forgets_less"
MODEL_OPTIONS = "tests/trainer/test_model_options.py"
ATTENTION = f"{MODEL_OPTIONS}::test_attention_is_the_loaded_models_implementation"
DTYPE = f"{MODEL_OPTIONS}::test_dtype_is_the_loaded_weights_dtype"
TRAINING_OPTIONS = "tests/trainer/test_training_options.py"
OPTIMIZER_AND_SCHEDULER = f"{TRAINING_OPTIONS}::test_optimizer_and_scheduler_reach_the_trainer"
PRECISION = f"{TRAINING_OPTIONS}::test_precision_is_the_dtype_training_computes_in"
EVERY_MINUTES = (
    "tests/trainer/test_checkpoint_cadence.py::"
    "test_every_minutes_saves_when_that_much_time_has_passed_since_the_last_save"
)
ANCHOR = "tests/trainer/test_anchor.py::test_lora_sft_matches_plain_hf_trainer"
CLS = "tests/trainer/test_classification.py"
CLS_ANCHOR = f"{CLS}::test_lora_classification_matches_plain_hf_trainer_unweighted_and_weighted"
CLS_BAD_RECORDS = f"{CLS}::test_bad_records_exit_3_with_file_and_line_before_the_model_is_opened"
CLS_HEAD_ONLY = f"{CLS}::test_head_only_trains_the_score_layer_stops_early_on_f1_and_its_output_reproduces_the_metrics"
CLS_RESUME = f"{CLS}::test_oversampling_counts_and_a_killed_run_resumes_on_exactly_the_same_batches"
CLS_TWO_RANKS = f"{CLS}::test_two_ranks_ddp_and_zero2"
RL = "tests/trainer/test_rl.py"
RL_GRPO = f"{RL}::test_grpo_matches_plain_trl_and_the_reward_rises"
RL_RLOO = f"{RL}::test_rloo_trains_on_chat_against_a_reward_model"
RL_FLAT = f"{RL}::test_a_group_without_reward_spread_has_zero_advantage"
RL_ZERO2 = f"{RL}::test_two_ranks_zero2_killed_then_resumed_draw_every_prompt_once"
PPO = "tests/trainer/test_ppo.py"
PPO_LEARNS = f"{PPO}::test_ppo_raises_the_reward_to_0_8_with_a_bounded_kl"
PPO_KNOBS = f"{PPO}::test_every_ppo_knob_reaches_the_updates"
RL_REWARDS = "tests/unit/test_rewards.py"
RL_LENGTH = f"{RL_REWARDS}::test_length_counts_generated_tokens_without_the_end_of_sequence"
RL_EXACT = f"{RL_REWARDS}::test_exact_match_and_contains_compare_with_the_reference"
QA = "tests/trainer/test_qa.py"
QA_ANCHOR = f"{QA}::test_full_qa_matches_plain_hf_question_answering_trainer"
QA_RUN = f"{QA}::test_a_qa_run_trains_and_reports_exact_match_and_f1"
QA_SPEC = f"{QA}::test_the_spec_chooses_the_longest_answer_and_the_metrics_reported"
REWARD = "tests/trainer/test_reward.py"
REWARD_ANCHOR = f"{REWARD}::test_lora_reward_matches_plain_trl_reward_trainer_with_centred_rewards"
REWARD_RUN = (
    f"{REWARD}::test_a_base_without_pad_token_learns_the_preferences_and_its_output_scores_chosen_above_rejected"
)
BAD_RECORDS = "tests/trainer/test_data.py::test_bad_records_are_reported_with_file_and_line_before_training"
BUILDERS_CREDENTIALS = "tests/unit/test_builders.py::test_the_credentials_secret_keys_become_the_pods_aws_variables"
BUILDERS_CLOUD_CREDENTIALS = (
    "tests/unit/test_builders.py::test_gcs_and_azure_credentials_reach_the_pod_as_their_sdks_read_them"
)
BUILDERS_ENV_SOURCES = (
    "tests/unit/test_builders.py::test_extra_environment_takes_literals_and_secret_and_config_map_keys"
)
BUILDERS_GANG = "tests/unit/test_builders.py::test_indexed_job_wires_a_torchrun_gang"
BUILDERS_GRACE = "tests/unit/test_builders.py::test_the_pod_grace_period_is_the_checkpoint_grace_period_plus_a_margin"
BUILDERS_METRICS = "tests/unit/test_builders.py::test_metrics_ports_exist_only_when_metrics_are_enabled"
BUILDERS_POD_LABELS = "tests/unit/test_builders.py::test_pod_labels_reach_the_pods_and_the_operators_own_labels_win"
BUILDERS_PROCS_AUTO = "tests/unit/test_builders.py::test_auto_procs_per_node_is_one_process_per_gpu"
BUILDERS_PULL_POLICY = (
    "tests/unit/test_builders.py::test_the_image_pull_policy_follows_the_spec_unless_the_operator_overrides_it"
)
BUILDERS_RESOURCES = "tests/unit/test_builders.py::test_accelerators_and_shared_memory_follow_the_resources_spec"
MEMORY_FIT = "tests/unit/test_memory_estimate.py::test_gpu_memory_decides_the_fit"
BUILDERS_SCHEDULING = "tests/unit/test_builders.py::test_scheduling_fields_queue_and_suspend_pass_through"
BUILDERS_STORAGE_ENV = (
    "tests/unit/test_builders.py::test_the_pod_environment_reaches_the_checkpoint_store_for_every_uri"
)
BUILDERS_TOLERATIONS = "tests/unit/test_builders.py::test_tolerations_reach_the_pods_as_written"
DATA_DEFECT = "tests/trainer/test_data_defects.py::test_data_defect_exits_3_before_the_model_is_opened"
DEADLINE = "tests/unit/test_reconcile.py::test_deadline_exceeded_fails_and_deletes_the_job"
DEEPSPEED_CONFIG = "tests/trainer/test_training_options.py::test_deepspeed_config_follows_the_spec"
DEEPSPEED_USER_CONFIG = (
    "tests/trainer/test_distributed_options.py::test_a_user_deepspeed_config_from_a_config_map_is_what_the_trainer_gets"
)
DISTRIBUTED_BACKEND = (
    "tests/trainer/test_distributed_options.py::test_backend_gloo_is_the_process_groups_where_auto_would_pick_nccl"
)
EARLY_STOPPING = "tests/trainer/test_training_options.py::test_early_stopping_loads_the_best_model"
EXAMPLE = "tests/trainer/test_tasks_and_examples.py::test_every_example_validates_and_trains"
HYPERPARAMETERS = "tests/trainer/test_training_options.py::test_hyperparameters_map_to_training_arguments"
EVAL_METRICS = "tests/trainer/test_training_options.py::test_evaluation_metrics_choose_what_is_reported"
MERGED_EQUALS_ADAPTER = "tests/trainer/test_outputs.py::test_lora_merged_equals_adapter_and_added_tokens_train"
METHOD = "tests/trainer/test_methods.py::test_method_trains_and_saves"
MONITORING = "tests/e2e/test_e2e_monitoring.py::test_dashboards_and_alerts_against_a_real_training_and_operator"
POD_TEMPLATE_TRAINS = "tests/e2e/test_e2e_contract.py::test_rendered_pod_template_trains_as_two_processes"
PREEMPTION_SCRAPED = (
    "tests/trainer/test_metrics_and_preemption.py::"
    "test_prometheus_scrapes_every_metric_then_sigterm_commits_and_exits_85"
)
PREFLIGHT_JOB = (
    "tests/unit/test_builders.py::test_the_preflight_job_is_cpu_only_with_its_own_resources_and_the_jobs_credentials"
)
PREFLIGHT_RUNS = "tests/unit/test_reconcile.py::test_the_preflight_runs_before_the_gang_and_its_stored_result_starts_it"
REPORT = "tests/trainer/test_report.py::test_report_of_a_finished_run"
RESUME = "tests/trainer/test_resume.py::test_kill_one_rank_then_resume_exactly"
RESUME_PLAN = "tests/trainer/test_checkpoint_store.py::test_resume_plan_refuses_another_spec_and_never_starts_over"
STORAGE = "tests/trainer/test_storage.py::test_model_data_and_outputs_on_s3"
TASK = "tests/trainer/test_tasks_and_examples.py::test_validate_accepts_a_task_iff_the_trainer_trains_it"
TWO_RANKS = "tests/trainer/test_distributed.py::test_two_ranks"
DPO = "tests/trainer/test_dpo.py"
DPO_ANCHOR = f"{DPO}::test_lora_dpo_matches_plain_trl"
DPO_LOSSES = f"{DPO}::test_every_loss_type_reaches_trl"
DPO_PRECOMPUTED = f"{DPO}::test_full_dpo_reference_copy_or_precomputed"
DPO_REFERENCE = f"{DPO}::test_reference_model_is_the_one_named"
DISTILL = "tests/trainer/test_distill.py"
DISTILL_RUNS = f"{DISTILL}::test_two_ranks_bring_the_student_to_the_teacher"
DISTILL_4BIT = f"{DISTILL}::test_a_4bit_teacher"
DISTILL_EARLY_STOP = f"{DISTILL}::test_early_stopping_watches_agreement"
ZERO3_PARAMS_OFFLOAD = (
    "tests/trainer/test_distributed_options.py::"
    "test_zero3_keeps_the_parameters_on_the_device_unless_their_offload_is_asked"
)

CONSUMPTION: dict[str, str] = {
    # -- spec.checkpoint: durable checkpoints and resume (trainer), credentials and store (pods) ----------
    "spec.checkpoint.credentials.accessKeyIdKey": f"{BUILDERS_CREDENTIALS}[own-keys-and-session-token]",
    "spec.checkpoint.credentials.connectionStringKey": BUILDERS_CLOUD_CREDENTIALS,
    "spec.checkpoint.credentials.name": BUILDERS_GANG,
    "spec.checkpoint.credentials.secretAccessKeyKey": f"{BUILDERS_CREDENTIALS}[own-keys-and-session-token]",
    "spec.checkpoint.credentials.serviceAccountKeyKey": BUILDERS_CLOUD_CREDENTIALS,
    "spec.checkpoint.credentials.sessionTokenKey": f"{BUILDERS_CREDENTIALS}[own-keys-and-session-token]",
    "spec.checkpoint.endpointUrl": BUILDERS_STORAGE_ENV,
    "spec.checkpoint.everyMinutes": EVERY_MINUTES,
    "spec.checkpoint.everySteps": RESUME,
    "spec.checkpoint.gracePeriodSeconds": BUILDERS_GRACE,
    "spec.checkpoint.keepBest": PREEMPTION_SCRAPED,
    "spec.checkpoint.keepLast": RESUME,
    "spec.checkpoint.region": BUILDERS_STORAGE_ENV,
    "spec.checkpoint.resume=auto": RESUME,
    "spec.checkpoint.resume=never": RESUME_PLAN,
    # everySteps 100: only the preemption save can commit the checkpoint the rerun resumes from.
    "spec.checkpoint.saveOnPreemption": "tests/trainer/test_resume.py::test_deepspeed_sigterm_then_resume_exactly",
    "spec.checkpoint.uri": RESUME,
    # -- spec.data: records, formats, tokenization --------------------------------------------------------
    "spec.data.augmentation.backTranslation.backward": BACK_TRANSLATION,  # the copies are the two models' output
    "spec.data.augmentation.backTranslation.batchSize": BACK_TRANSLATION,  # the translators' batch sizes
    "spec.data.augmentation.backTranslation.copies": BACK_TRANSLATION,
    "spec.data.augmentation.backTranslation.forward": BACK_TRANSLATION,
    "spec.data.augmentation.backTranslation.maxNewTokens": BACK_TRANSLATION,  # equal to generating that many
    "spec.data.augmentation.randomDeletion.alpha": f"{ALPHA}[randomDeletion]",
    "spec.data.augmentation.randomDeletion.copies": AUGMENTED_COPIES,
    "spec.data.augmentation.randomInsertion.alpha": f"{ALPHA}[randomInsertion]",
    "spec.data.augmentation.randomInsertion.copies": AUGMENTED_COPIES,
    "spec.data.augmentation.randomSwap.alpha": f"{ALPHA}[randomSwap]",
    "spec.data.augmentation.randomSwap.copies": AUGMENTED_COPIES,
    "spec.data.augmentation.synonymReplacement.alpha": f"{ALPHA}[synonymReplacement]",
    "spec.data.augmentation.synonymReplacement.copies": AUGMENTED_COPIES,
    "spec.data.columns.answers": QA_RUN,  # the run's data has its own column names
    "spec.data.columns.chosen": PREFERENCE_COLUMNS,  # renamed columns read, and named in the problem
    "spec.data.columns.completion": f"{EXAMPLE}[qlora]",  # the example maps completion: output
    "spec.data.columns.context": QA_RUN,
    "spec.data.columns.label": CLS_BAD_RECORDS,  # the records' label column is called color
    "spec.data.columns.messages": f"{COLUMNS_READ}[messages]",
    "spec.data.columns.prompt": f"{DATA_DEFECT}[column-no-record-has]",
    "spec.data.columns.question": QA_RUN,
    "spec.data.columns.rejected": PREFERENCE_COLUMNS,
    "spec.data.columns.text": f"{COLUMNS_READ}[text]",
    "spec.data.completionOnlyLoss": "tests/trainer/test_data.py::test_completion_only_loss_masks_the_prompt",
    "spec.data.eval.fileType=auto": f"{EXAMPLE}[lora-sft-2-nodes]",  # its eval file, read as JSONL by extension
    "spec.data.eval.fileType=csv": f"{FILE_TYPE}[csv]",
    "spec.data.eval.fileType=json": f"{FILE_TYPE}[json]",
    "spec.data.eval.fileType=jsonl": f"{FILE_TYPE}[jsonl]",
    "spec.data.eval.fileType=parquet": f"{FILE_TYPE}[parquet]",
    "spec.data.eval.maxSamples": MAX_SAMPLES,
    "spec.data.eval.uri": f"{DATA_DEFECT}[eval-file-broken]",
    "spec.data.evalSplit": f"{DATA_DEFECT}[eval-split-leaves-nothing]",
    "spec.data.format=chat": "tests/trainer/test_data.py::test_assistant_only_masking_token_by_token",
    "spec.data.format=classification": f"{TASK}[classification]",
    "spec.data.format=preference": f"{DPO_ANCHOR}[sigmoid]",
    "spec.data.format=promptCompletion": BAD_RECORDS,
    "spec.data.format=qa": QA_RUN,
    "spec.data.format=text": ANCHOR,
    "spec.data.maxSeqLength": "tests/trainer/test_data.py::test_text_is_cut_into_blocks",
    "spec.data.packing": f"{DATA_OPTIONS}::test_packing_packs_the_rows_a_run_trains_on",
    "spec.data.systemPrompt": f"{DATA_OPTIONS}::test_system_prompt_opens_conversations_that_have_none",
    "spec.data.train.fileType=auto": STORAGE,  # Parquet and CSV files side by side, by extension
    "spec.data.train.fileType=csv": f"{FILE_TYPE}[csv]",
    "spec.data.train.fileType=json": f"{FILE_TYPE}[json]",
    "spec.data.train.fileType=jsonl": f"{FILE_TYPE}[jsonl]",
    "spec.data.train.fileType=parquet": f"{FILE_TYPE}[parquet]",
    "spec.data.train.maxSamples": MAX_SAMPLES,
    "spec.data.train.uri": STORAGE,
    # -- spec.distributed: the torchrun gang, DeepSpeed ---------------------------------------------------
    "spec.distributed.backend=auto": f"{TWO_RANKS}[ddp-lora]",  # gloo on CPU
    "spec.distributed.backend=gloo": DISTRIBUTED_BACKEND,
    "spec.distributed.deepspeed.config.key": DEEPSPEED_USER_CONFIG,
    "spec.distributed.deepspeed.config.name": DEEPSPEED_USER_CONFIG,
    "spec.distributed.deepspeed.offloadOptimizer=cpu": f"{TWO_RANKS}[zero2-offload-lora]",
    "spec.distributed.deepspeed.offloadOptimizer=none": f"{TWO_RANKS}[zero2-lora]",
    "spec.distributed.deepspeed.offloadParams=cpu": DEEPSPEED_CONFIG,
    "spec.distributed.deepspeed.offloadParams=none": ZERO3_PARAMS_OFFLOAD,
    "spec.distributed.deepspeed.zeroStage": f"{TWO_RANKS}[zero3-lora]",
    "spec.distributed.nodes": BUILDERS_GANG,
    "spec.distributed.procsPerNode": BUILDERS_GANG,
    "spec.distributed.procsPerNode=auto": BUILDERS_PROCS_AUTO,
    "spec.distributed.rendezvousPort": POD_TEMPLATE_TRAINS,
    # -- spec.method: which parameters train --------------------------------------------------------------
    "spec.method.adalora.beta1": ADALORA_WEIGHTS,
    "spec.method.adalora.beta2": ADALORA_WEIGHTS,
    "spec.method.adalora.deltaT": f"{ADALORA_SCHEDULE}[warm-up-and-final-steps]",
    "spec.method.adalora.initR": f"{ADALORA_SCHEDULE}[to-the-last-step]",
    "spec.method.adalora.orthRegWeight": ADALORA_WEIGHTS,
    "spec.method.adalora.targetR": f"{ADALORA_SCHEDULE}[to-the-last-step]",
    "spec.method.adalora.tfinal": f"{ADALORA_SCHEDULE}[warm-up-and-final-steps]",
    "spec.method.adalora.tinit": f"{ADALORA_SCHEDULE}[warm-up-and-final-steps]",
    "spec.method.freeze.headOnly": f"{FREEZE}[head-only]",
    "spec.method.freeze.lastLayers": f"{FREEZE}[last-layer]",
    "spec.method.freeze.patterns": f"{FREEZE}[patterns]",
    "spec.method.ia3.feedforwardModules": f"{IA3}[targets-and-feedforward]",
    "spec.method.ia3.targetModules": f"{IA3}[targets-and-feedforward]",
    "spec.method.lora.alpha": ANCHOR,
    "spec.method.lora.bias=all": f"{LORA_BIAS}[all]",
    "spec.method.lora.bias=lora_only": f"{LORA_BIAS}[lora-only]",
    "spec.method.lora.bias=none": ANCHOR,
    "spec.method.lora.dropout": ANCHOR,
    "spec.method.lora.modulesToSave": f"{MODULES_TO_SAVE}[lora]",
    "spec.method.lora.r": ANCHOR,
    "spec.method.lora.targetModules": ANCHOR,
    "spec.method.lora.useDora": f"{LORA_SCALING}[dora]",
    "spec.method.lora.useRslora": f"{LORA_SCALING}[rslora]",
    "spec.method.prefix.numVirtualTokens": f"{VIRTUAL_TOKENS}[prefix]",
    "spec.method.prefix.projection": f"{VIRTUAL_TOKENS}[prefix-projection]",
    "spec.method.prompt.initText": f"{PROMPT_INIT}[init-text]",
    "spec.method.prompt.numVirtualTokens": f"{VIRTUAL_TOKENS}[prompt]",
    "spec.method.quantization.computeDtype=bf16": f"{QUANTIZATION}[defaults]",
    "spec.method.quantization.computeDtype=fp16": f"{QUANTIZATION}[fp4-single-fp16]",
    "spec.method.quantization.computeDtype=fp32": f"{QUANTIZATION}[fp32]",
    "spec.method.quantization.doubleQuant": f"{QUANTIZATION}[fp4-single-fp16]",
    "spec.method.quantization.quantType=fp4": f"{QUANTIZATION}[fp4-single-fp16]",
    "spec.method.quantization.quantType=nf4": "tests/trainer/test_outputs.py::test_qlora_merge_dequantizes_the_base",
    "spec.method.type=adalora": f"{METHOD}[adalora]",
    "spec.method.type=full": f"{METHOD}[full]",
    "spec.method.type=ia3": f"{METHOD}[ia3]",
    "spec.method.type=lora": f"{METHOD}[lora]",
    "spec.method.type=prefix": f"{METHOD}[prefix]",
    "spec.method.type=prompt": f"{METHOD}[prompt]",
    "spec.method.type=qlora": f"{METHOD}[qlora]",
    # -- spec.metrics: Prometheus on every rank -----------------------------------------------------------
    # the trainer side: tests/trainer/test_metrics_and_preemption.py::test_metrics_disabled_start_no_server
    "spec.metrics.enabled": f"{BUILDERS_METRICS}[disabled]",
    "spec.metrics.port": MONITORING,
    # -- spec.model: the base model -----------------------------------------------------------------------
    "spec.model.addTokens": f"{MERGED_EQUALS_ADAPTER}[untied]",
    "spec.model.attention=auto": f"{ATTENTION}[auto]",
    "spec.model.attention=eager": f"{ATTENTION}[eager]",
    "spec.model.attention=sdpa": f"{ATTENTION}[sdpa]",
    "spec.model.chatTemplate": f"{MODEL_OPTIONS}::test_chat_template_renders_chat_records",
    "spec.model.dtype=auto": f"{DTYPE}[auto]",
    "spec.model.dtype=bf16": f"{DTYPE}[bf16]",
    "spec.model.dtype=fp16": f"{DTYPE}[fp16]",
    "spec.model.dtype=fp32": f"{DTYPE}[fp32]",
    "spec.model.ggufFile": "tests/trainer/test_quickstart.py::test_quickstart",
    "spec.model.mineTokens.column": MINED_CORPUS,
    "spec.model.mineTokens.corpus.fileType=auto": MINED_CORPUS,  # a .jsonl corpus, by its extension
    "spec.model.mineTokens.corpus.fileType=csv": f"{MINED_FILE_TYPE}[csv]",
    "spec.model.mineTokens.corpus.fileType=json": f"{MINED_FILE_TYPE}[json]",
    "spec.model.mineTokens.corpus.fileType=jsonl": f"{MINED_FILE_TYPE}[jsonl]",
    "spec.model.mineTokens.corpus.fileType=parquet": f"{MINED_FILE_TYPE}[parquet]",
    "spec.model.mineTokens.corpus.maxSamples": f"{MINED_FILE_TYPE}[jsonl]",  # the first 10 records' words
    "spec.model.mineTokens.corpus.uri": MINED_CORPUS,
    "spec.model.mineTokens.maxTokens": MINED,  # 3 words, then 4 of the corpus's
    "spec.model.mineTokens.minCount": MINED,  # a 4-piece word occurring twice is left out
    "spec.model.mineTokens.minPieces": MINED,  # a 3-piece word occurring 5 times is left out
    "spec.model.revision": f"{MODEL_OPTIONS}::test_revision_selects_the_hub_commit[branch]",
    "spec.model.trustRemoteCode": f"{MODEL_OPTIONS}::test_trust_remote_code_runs_the_models_own_code",
    "spec.model.uri": STORAGE,
    # -- spec.output: what a finished job leaves ----------------------------------------------------------
    "spec.output.save=adapter": f"{METHOD}[prefix]",
    "spec.output.save=auto": f"{METHOD}[lora]",  # an adapter for PEFT methods; [full] saves the model
    "spec.output.save=both": STORAGE,
    "spec.output.save=merged": f"{METHOD}[ia3]",
    "spec.output.uri": STORAGE,
    # -- spec.preflight: the CPU-only check before the gang (the operator) ---------------------------------
    "spec.preflight.activeDeadlineSeconds": PREFLIGHT_JOB,
    "spec.preflight.allowWillNotFit": (
        "tests/unit/test_reconcile.py::test_a_job_that_cannot_fit_fails_will_not_fit_unless_allowed"
    ),
    "spec.preflight.mode=auto": PREFLIGHT_RUNS,
    "spec.preflight.mode=skip": "tests/unit/test_reconcile.py::test_mode_skip_starts_the_gang_at_once",
    "spec.preflight.resources.cpu": PREFLIGHT_JOB,
    "spec.preflight.resources.memory": PREFLIGHT_JOB,
    # -- spec.resources: the pods -------------------------------------------------------------------------
    "spec.resources.affinity": BUILDERS_SCHEDULING,
    "spec.resources.cpu": BUILDERS_GANG,
    "spec.resources.env[].name": BUILDERS_SCHEDULING,
    "spec.resources.env[].value": BUILDERS_SCHEDULING,
    "spec.resources.env[].valueFrom.configMapKeyRef.key": BUILDERS_ENV_SOURCES,
    "spec.resources.env[].valueFrom.configMapKeyRef.name": BUILDERS_ENV_SOURCES,
    "spec.resources.env[].valueFrom.secretKeyRef.key": BUILDERS_ENV_SOURCES,
    "spec.resources.env[].valueFrom.secretKeyRef.name": BUILDERS_ENV_SOURCES,
    "spec.resources.gpuMemory": MEMORY_FIT,
    "spec.resources.gpuResourceName": BUILDERS_RESOURCES,
    "spec.resources.gpusPerNode": BUILDERS_GANG,
    "spec.resources.image": BUILDERS_SCHEDULING,
    "spec.resources.imagePullPolicy=Always": f"{BUILDERS_PULL_POLICY}[Always]",
    "spec.resources.imagePullPolicy=IfNotPresent": f"{BUILDERS_PULL_POLICY}[IfNotPresent]",
    "spec.resources.imagePullPolicy=Never": f"{BUILDERS_PULL_POLICY}[Never]",
    "spec.resources.imagePullSecrets[].name": BUILDERS_SCHEDULING,
    "spec.resources.memory": BUILDERS_GANG,
    "spec.resources.nodeSelector": BUILDERS_SCHEDULING,
    "spec.resources.podAnnotations": BUILDERS_SCHEDULING,
    "spec.resources.podLabels": BUILDERS_POD_LABELS,
    "spec.resources.priorityClassName": BUILDERS_SCHEDULING,
    "spec.resources.sharedMemory": BUILDERS_RESOURCES,
    "spec.resources.tolerations[].effect=NoExecute": BUILDERS_TOLERATIONS,
    "spec.resources.tolerations[].effect=NoSchedule": BUILDERS_SCHEDULING,
    "spec.resources.tolerations[].effect=PreferNoSchedule": BUILDERS_TOLERATIONS,
    "spec.resources.tolerations[].key": BUILDERS_SCHEDULING,
    "spec.resources.tolerations[].operator=Equal": BUILDERS_TOLERATIONS,
    "spec.resources.tolerations[].operator=Exists": BUILDERS_SCHEDULING,
    "spec.resources.tolerations[].tolerationSeconds": BUILDERS_TOLERATIONS,
    "spec.resources.tolerations[].value": BUILDERS_TOLERATIONS,
    # -- spec.runPolicy: lifecycle (the operator) ---------------------------------------------------------
    "spec.runPolicy.activeDeadlineSeconds": DEADLINE,
    "spec.runPolicy.backoffLimit": "tests/unit/test_reconcile.py::test_backoff_exhausted_fails",
    "spec.runPolicy.onStall=fail": "tests/unit/test_reconcile.py::test_on_stall_fail_or_none[fail]",
    "spec.runPolicy.onStall=none": "tests/unit/test_reconcile.py::test_on_stall_fail_or_none[none]",
    "spec.runPolicy.onStall=restart": STALL_RESTART,
    "spec.runPolicy.queueName": BUILDERS_SCHEDULING,
    "spec.runPolicy.stallTimeoutSeconds": STALL_RESTART,
    "spec.runPolicy.suspend": "tests/unit/test_reconcile.py::test_suspend_and_resume",
    "spec.runPolicy.ttlSecondsAfterFinished": "tests/unit/test_reconcile.py::test_ttl_deletes_the_finished_job",
    # -- spec.task: the objective; tasks without a recipe and all their parameters are refused ------------
    # The weighted runs' losses equal the plain script's with the same weights (balanced: computed by
    # scikit-learn); resampling none is the plain script's sampler.
    "spec.task.classification.balanceClassWeights": CLS_ANCHOR,
    "spec.task.classification.classWeights": CLS_ANCHOR,
    "spec.task.classification.labels": CLS_BAD_RECORDS,  # a name that is not one of them is refused
    "spec.task.classification.multiLabel": f"{CLS_TWO_RANKS}[ddp-multi-label]",
    "spec.task.classification.numLabels": CLS_HEAD_ONLY,  # the trained layer is hidden size x numLabels
    "spec.task.classification.resampling=none": CLS_ANCHOR,
    "spec.task.classification.resampling=oversample": CLS_RESUME,
    "spec.task.classification.resampling=undersample": f"{CLS_TWO_RANKS}[zero2-undersample]",
    # The logged loss is alpha * kd_loss + (1 - alpha) * ce_loss; the held-out KL (at the temperature) is
    # the saved student's to the named teacher, computed by hand.
    "spec.task.distill.alpha": f"{DISTILL_RUNS}[ddp]",
    "spec.task.distill.teacher": f"{DISTILL_RUNS}[ddp]",
    "spec.task.distill.teacherQuantization=fp4": f"{DISTILL_4BIT}[fp4]",
    "spec.task.distill.teacherQuantization=nf4": f"{DISTILL_4BIT}[nf4]",
    "spec.task.distill.teacherQuantization=none": f"{DISTILL_RUNS}[ddp]",
    "spec.task.distill.temperature": f"{DISTILL_RUNS}[ddp]",
    "spec.task.dpo.beta": DPO_LOSSES,
    "spec.task.dpo.labelSmoothing": DPO_LOSSES,
    "spec.task.dpo.lossType=apoDown": DPO_LOSSES,
    "spec.task.dpo.lossType=apoZero": DPO_LOSSES,
    "spec.task.dpo.lossType=bcoPair": DPO_LOSSES,
    "spec.task.dpo.lossType=exoPair": DPO_LOSSES,
    "spec.task.dpo.lossType=hinge": DPO_LOSSES,
    "spec.task.dpo.lossType=ipo": f"{DPO_ANCHOR}[ipo]",
    "spec.task.dpo.lossType=ncaPair": DPO_LOSSES,
    "spec.task.dpo.lossType=robust": DPO_LOSSES,
    "spec.task.dpo.lossType=sigmoid": f"{DPO_ANCHOR}[sigmoid]",
    "spec.task.dpo.lossType=sigmoidNorm": DPO_LOSSES,
    "spec.task.dpo.lossType=sppoHard": DPO_LOSSES,
    "spec.task.dpo.precomputeReferenceLogProbs": DPO_PRECOMPUTED,
    "spec.task.dpo.referenceModel": DPO_REFERENCE,
    "spec.task.qa.docStride": QA_ANCHOR,  # the run's windows are the textbook's with that stride
    "spec.task.qa.maxAnswerLength": QA_SPEC,
    # Our per-step losses equal trl's with the coefficient, whose first loss differs from trl's without it.
    "spec.task.reward.centerRewardsCoefficient": REWARD_ANCHOR,
    # GRPO's per-step loss, reward and KL equal a plain trl script's with the same (non-default) klCoef,
    # temperature, maxNewTokens and regex; RLOO's reward is the weighted sum of the reward model's and
    # the verifiable rewards'; the length, exactMatch and contains rules are the unit tests' cases.
    "spec.task.rl.algorithm=grpo": RL_GRPO,
    "spec.task.rl.algorithm=ppo": PPO_LEARNS,
    "spec.task.rl.algorithm=rloo": RL_RLOO,
    "spec.task.rl.klCoef": RL_GRPO,
    "spec.task.rl.maxNewTokens": RL_GRPO,
    "spec.task.rl.numGenerations": RL_ZERO2,  # 2 per group: the prompts a step draws
    # Each PPO knob set off its default is seen in what the run logs (steps per rollout, loss = policy +
    # coef x value loss, step 1's returns and policy loss, clipping at small ranges and not at large ones).
    "spec.task.rl.ppo.clipRange": PPO_KNOBS,
    "spec.task.rl.ppo.epochs": PPO_KNOBS,
    "spec.task.rl.ppo.gaeLambda": PPO_KNOBS,
    "spec.task.rl.ppo.gamma": PPO_KNOBS,
    "spec.task.rl.ppo.valueClipRange": PPO_KNOBS,
    "spec.task.rl.ppo.valueCoef": PPO_KNOBS,
    "spec.task.rl.ppo.whitenAdvantages": PPO_KNOBS,
    "spec.task.rl.rewardModel": RL_RLOO,
    "spec.task.rl.rewards[].maxTokens": RL_LENGTH,
    "spec.task.rl.rewards[].minTokens": RL_LENGTH,
    "spec.task.rl.rewards[].pattern": RL_GRPO,
    "spec.task.rl.rewards[].type=contains": RL_RLOO,
    "spec.task.rl.rewards[].type=exactMatch": RL_EXACT,
    "spec.task.rl.rewards[].type=jsonValid": RL_FLAT,
    "spec.task.rl.rewards[].type=length": RL_RLOO,
    "spec.task.rl.rewards[].type=regex": RL_GRPO,
    "spec.task.rl.rewards[].weight": RL_RLOO,
    "spec.task.rl.temperature": RL_GRPO,
    "spec.task.type=classification": f"{TASK}[classification]",
    "spec.task.type=distill": f"{DISTILL_RUNS}[ddp]",
    "spec.task.type=dpo": f"{DPO_ANCHOR}[sigmoid]",
    "spec.task.type=pretrain": f"{TASK}[pretrain]",
    "spec.task.type=qa": QA_RUN,
    "spec.task.type=reward": REWARD_RUN,
    "spec.task.type=rl": RL_GRPO,
    "spec.task.type=sft": f"{TASK}[sft]",
    # -- spec.training: optimization, evaluation, early stopping, forgetting ------------------------------
    "spec.training.divergence.consecutiveLogs": ROLLBACK,  # detected at the 3rd window above: step 13
    "spec.training.divergence.learningRateScale": ROLLBACK,
    "spec.training.divergence.lossFactor": DIVERGENCE_FAILS,
    "spec.training.divergence.maxRollbacks": ROLLBACKS_USED,
    "spec.training.dropout": f"{MODEL_OPTIONS}::test_dropout_sets_the_models_dropout_probabilities",
    # accuracy and f1: classification runs that watch them; exactMatch: see the qa task.
    "spec.training.earlyStopping.metric=accuracy": f"{CLS_TWO_RANKS}[zero2-undersample]",
    "spec.training.earlyStopping.metric=agreement": DISTILL_EARLY_STOP,
    "spec.training.earlyStopping.metric=bleu": f"{GENERATION_EARLY_STOP}[bleu]",
    "spec.training.earlyStopping.metric=evalLoss": EARLY_STOPPING,
    "spec.training.earlyStopping.metric=exactMatch": QA_RUN,  # the best checkpoint by exact match is loaded
    "spec.training.earlyStopping.metric=f1": CLS_HEAD_ONLY,
    "spec.training.earlyStopping.metric=perplexity": f"{EVAL_METRICS}[perplexity-early-stopping]",
    "spec.training.earlyStopping.metric=rouge": GENERATION_RUN,  # checkpoint-5, the best ROUGE-L, loaded
    "spec.training.earlyStopping.mode=max": f"{EARLY_STOPPING}[max]",
    "spec.training.earlyStopping.mode=min": EARLY_STOPPING,
    "spec.training.earlyStopping.patience": EARLY_STOPPING,
    "spec.training.earlyStopping.threshold": EARLY_STOPPING,
    "spec.training.epochs": f"{TRAINING_OPTIONS}::test_epochs_set_the_length_of_training",
    "spec.training.evaluation.everySteps": HYPERPARAMETERS,
    "spec.training.evaluation.generation.maxNewTokens": GENERATION_RUN,  # equal to 8-token generations alone
    "spec.training.evaluation.generation.samples": GENERATION_RUN,  # 9 prompts, split 5 and 4
    "spec.training.evaluation.metrics=accuracy": f"{CLS_TWO_RANKS}[zero2-undersample]",  # no F1 reported
    "spec.training.evaluation.metrics=agreement": DISTILL_EARLY_STOP,
    "spec.training.evaluation.metrics=bleu": GENERATION_RUN,
    "spec.training.evaluation.metrics=exactMatch": QA_SPEC,  # no F1 reported
    "spec.training.evaluation.metrics=f1": CLS_HEAD_ONLY,  # no accuracy reported
    "spec.training.evaluation.metrics=loss": f"{EVAL_METRICS}[loss-only]",
    "spec.training.evaluation.metrics=perplexity": f"{EVAL_METRICS}[perplexity-early-stopping]",
    "spec.training.evaluation.metrics=rouge": GENERATION_RUN,
    "spec.training.forgetting.ewc.fisherData.fileType=auto": EWC_RUN,
    "spec.training.forgetting.ewc.fisherData.fileType=csv": f"{FORGETTING_SOURCES}[csv]",
    "spec.training.forgetting.ewc.fisherData.fileType=json": f"{FORGETTING_SOURCES}[json]",
    "spec.training.forgetting.ewc.fisherData.fileType=jsonl": f"{FORGETTING_SOURCES}[jsonl]",
    "spec.training.forgetting.ewc.fisherData.fileType=parquet": f"{FORGETTING_SOURCES}[parquet]",
    "spec.training.forgetting.ewc.fisherData.maxSamples": f"{FORGETTING_SOURCES}[jsonl]",
    "spec.training.forgetting.ewc.fisherData.uri": EWC_RUN,
    "spec.training.forgetting.ewc.fisherSamples": EWC_RUN,
    "spec.training.forgetting.ewc.strength": EWC_RUN,
    "spec.training.forgetting.generalEval.fileType=auto": REPORT,
    "spec.training.forgetting.generalEval.fileType=csv": f"{FILE_TYPE}[csv]",
    "spec.training.forgetting.generalEval.fileType=json": f"{FILE_TYPE}[json]",
    "spec.training.forgetting.generalEval.fileType=jsonl": f"{FILE_TYPE}[jsonl]",
    "spec.training.forgetting.generalEval.fileType=parquet": f"{FILE_TYPE}[parquet]",
    "spec.training.forgetting.generalEval.maxSamples": MAX_SAMPLES,
    "spec.training.forgetting.generalEval.uri": REPORT,
    "spec.training.forgetting.replay.ratio": REPLAY_RUN,  # the steps of an epoch count its replay rows
    "spec.training.forgetting.replay.source.fileType=auto": REPLAY_RUN,
    "spec.training.forgetting.replay.source.fileType=csv": f"{FORGETTING_SOURCES}[csv]",
    "spec.training.forgetting.replay.source.fileType=json": f"{FORGETTING_SOURCES}[json]",
    "spec.training.forgetting.replay.source.fileType=jsonl": f"{FORGETTING_SOURCES}[jsonl]",
    "spec.training.forgetting.replay.source.fileType=parquet": f"{FORGETTING_SOURCES}[parquet]",
    "spec.training.forgetting.replay.source.maxSamples": f"{FORGETTING_SOURCES}[jsonl]",
    "spec.training.forgetting.replay.source.uri": REPLAY_RUN,
    "spec.training.gradientAccumulationSteps": HYPERPARAMETERS,
    "spec.training.gradientCheckpointing": HYPERPARAMETERS,
    "spec.training.learningRate": HYPERPARAMETERS,
    "spec.training.logEverySteps": REPORT,  # every 2 steps: at least 8 of 16 logged
    "spec.training.maxGradNorm": HYPERPARAMETERS,
    "spec.training.maxSteps": HYPERPARAMETERS,
    "spec.training.onDivergence=fail": DIVERGENCE_FAILS,
    "spec.training.onDivergence=rollback": ROLLBACK,
    "spec.training.optimizer=adafactor": HYPERPARAMETERS,
    "spec.training.optimizer=adamw": f"{TWO_RANKS}[ddp-lora]",  # the optimizer that steps is torch's AdamW
    "spec.training.optimizer=sgd": OPTIMIZER_AND_SCHEDULER,
    "spec.training.perDeviceBatchSize": HYPERPARAMETERS,
    "spec.training.precision=auto": f"{PRECISION}[auto]",
    "spec.training.precision=bf16": f"{PRECISION}[bf16]",
    "spec.training.precision=fp32": f"{PRECISION}[fp32]",
    "spec.training.scheduler=constant": HYPERPARAMETERS,
    "spec.training.scheduler=cosine": OPTIMIZER_AND_SCHEDULER,
    "spec.training.scheduler=linear": HYPERPARAMETERS,
    "spec.training.seed": HYPERPARAMETERS,
    "spec.training.warmupRatio": HYPERPARAMETERS,
    "spec.training.warmupSteps": HYPERPARAMETERS,
    "spec.training.weightDecay": HYPERPARAMETERS,
}


#: Accepted, and no test shows what they do. Each needs a test that would fail if it were ignored (or
#: an admission refusal): then it moves to CONSUMPTION and UNPROVEN_COUNT goes down.
UNPROVEN: dict[str, str] = {
    # -- spec.checkpoint ----------------------------------------------------------------------------------
    # -- spec.data ----------------------------------------------------------------------------------------
    # -- spec.distributed ---------------------------------------------------------------------------------
    "spec.distributed.backend=nccl": "needs GPUs (refused without: nccl-without-gpus); no GPU test",
    # -- spec.model ---------------------------------------------------------------------------------------
    "spec.model.attention=flash_attention_2": "needs GPUs (refused without: flash-attention-without-gpus); no GPU test",
    # -- spec.resources -----------------------------------------------------------------------------------
    # -- spec.training ------------------------------------------------------------------------------------
    "spec.training.optimizer=adamw8bit": "needs CUDA (refused without GPUs: cuda-optimizer-without-gpus); no GPU test",
    "spec.training.optimizer=pagedAdamw32bit": "needs CUDA (refused without GPUs); no GPU test",
    "spec.training.optimizer=pagedAdamw8bit": "needs CUDA (refused without GPUs); no GPU test",
    "spec.training.precision=fp16": "needs CUDA (refused without GPUs: fp16-without-gpus); no GPU test",
}

#: len(UNPROVEN) when the map was made (issue 13). Lower it with every field that moves to CONSUMPTION;
#: never raise it: a new field of the API comes with its evidence.
UNPROVEN_COUNT = 6

#: The case ids of parametrized tests whose ids are computed rather than written in the file.
GENERATED_IDS: dict[str, Callable[[], Iterable[str]]] = {
    EXAMPLE: lambda: (p.stem for p in (REPO / "examples").glob("*.yaml") if p.name != "quickstart.yaml"),
    TASK: lambda: get_args(TaskType),
}


# --------------------------------------------------------------------------------------------------
# The walk over FineTuneJobSpec
# --------------------------------------------------------------------------------------------------


def _walk(annotation: Any, path: str) -> Iterator[str]:
    origin = get_origin(annotation)
    if origin is Annotated:
        yield from _walk(get_args(annotation)[0], path)
    elif origin in (Union, UnionType):  # optionals, and e.g. procsPerNode: int | Literal["auto"]
        for member in get_args(annotation):
            if member is not NoneType:
                yield from _walk(member, path)
    elif origin is Literal:
        yield from (f"{path}={value}" for value in get_args(annotation))
    elif origin is list:
        (item,) = get_args(annotation)
        nested = isinstance(item, type) and issubclass(item, BaseModel)
        yield from _walk(item, f"{path}[]" if nested else path)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            yield from _walk(field.annotation, f"{path}.{field.alias or name}")
    else:  # a scalar, or a dict (labels, node selector, affinity)
        yield path


def spec_leaves() -> set[str]:
    """Every leaf field and enum value of FineTuneJobSpec, by camelCase path."""
    return set(_walk(FineTuneJobSpec, "spec"))


def _test_reference(evidence: str) -> tuple[Path, str, str | None]:
    match = re.fullmatch(r"(tests/[\w/]+\.py)::(test_\w+)(?:\[(.+)\])?", evidence)
    assert match, f"{evidence!r}: name a test as tests/<path>.py::test_name[id], or a refusal as {REFUSED}<id>"
    return REPO / match.group(1), match.group(2), match.group(3)


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def test_the_walk_reaches_nested_models_lists_optionals_and_unions() -> None:
    leaves = spec_leaves()
    assert {
        "spec.training.evaluation.everySteps",  # nested models
        "spec.resources.env[].valueFrom.secretKeyRef.key",  # a list of models, then optionals
        "spec.method.type=qlora",  # an enum value
        "spec.training.evaluation.metrics=perplexity",  # an enum in an optional list
        "spec.distributed.procsPerNode",  # int | Literal["auto"]: the integer ...
        "spec.distributed.procsPerNode=auto",  # ... and the word
        "spec.resources.nodeSelector",  # a dict is one leaf
    } <= leaves
    assert "spec.method.type" not in leaves, "an enum field is its values"
    assert len(leaves) > 250


def test_every_leaf_and_enum_value_has_evidence() -> None:
    leaves = spec_leaves()
    missing = sorted(leaves - CONSUMPTION.keys() - UNPROVEN.keys())
    assert not missing, (
        "fields of the API with no evidence: name the test that shows each one's effect, or the INVALID row "
        f"of test_api_validation.py that refuses it, in CONSUMPTION: {missing}"
    )
    stale = sorted((CONSUMPTION.keys() | UNPROVEN.keys()) - leaves)
    assert not stale, f"entries for paths the API no longer has: {stale}"


def test_a_field_is_either_proven_or_unproven() -> None:
    both = sorted(CONSUMPTION.keys() & UNPROVEN.keys())
    assert not both, f"proven fields leave UNPROVEN (and UNPROVEN_COUNT goes down): {both}"


def test_unproven_only_shrinks() -> None:
    assert len(UNPROVEN) == UNPROVEN_COUNT, (
        f"UNPROVEN has {len(UNPROVEN)} entries, UNPROVEN_COUNT says {UNPROVEN_COUNT}: when a field gets its "
        "test, move it to CONSUMPTION and lower UNPROVEN_COUNT; a new field needs evidence, not an UNPROVEN entry"
    )
    assert all(reason.strip() for reason in UNPROVEN.values())


def test_the_map_is_sorted_by_path() -> None:
    for table in (CONSUMPTION, UNPROVEN):
        assert list(table) == sorted(table), [a for a, b in zip(table, sorted(table), strict=True) if a != b]


def test_every_named_test_exists() -> None:
    problems = []
    for path, evidence in CONSUMPTION.items():
        if evidence.startswith(REFUSED):
            continue
        file, name, case = _test_reference(evidence)
        if not file.is_file():
            problems.append(f"{path}: {file.relative_to(REPO)} does not exist")
            continue
        text = file.read_text(encoding="utf-8")
        if not re.search(rf"^(async )?def {name}\(", text, re.MULTILINE):
            problems.append(f"{path}: no def {name} in {file.relative_to(REPO)}")
        elif case is not None:
            base = evidence.partition("[")[0]
            generated = GENERATED_IDS[base]() if base in GENERATED_IDS else ()
            if f'"{case}"' not in text and f"'{case}'" not in text and case not in set(generated):
                problems.append(f"{path}: {name} has no case [{case}]")
    assert not problems, "\n".join(problems)


def test_every_named_refusal_is_a_row_the_api_server_replays() -> None:
    rows = {row[0] for row in INVALID}
    unknown = {
        path: evidence.removeprefix(REFUSED)
        for path, evidence in CONSUMPTION.items()
        if evidence.startswith(REFUSED) and evidence.removeprefix(REFUSED) not in rows
    }
    assert not unknown, f"not INVALID rows of tests/unit/test_api_validation.py: {unknown}"
