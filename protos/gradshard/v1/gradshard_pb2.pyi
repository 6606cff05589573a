from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]

class Model(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_UNSPECIFIED: _ClassVar[Model]
    LINEAR: _ClassVar[Model]
    LOGISTIC: _ClassVar[Model]
    SOFTMAX: _ClassVar[Model]
    MLP: _ClassVar[Model]

class Activation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_UNSPECIFIED: _ClassVar[Activation]
    RELU: _ClassVar[Activation]
    TANH: _ClassVar[Activation]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PACK: _ClassVar[Placement]
    SPREAD: _ClassVar[Placement]
    STRICT_SPREAD: _ClassVar[Placement]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[OptimizerKind]
    SGD: _ClassVar[OptimizerKind]
    MOMENTUM: _ClassVar[OptimizerKind]
    ADAM: _ClassVar[OptimizerKind]
    ADAMW: _ClassVar[OptimizerKind]

class ScheduleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULE_UNSPECIFIED: _ClassVar[ScheduleKind]
    CONSTANT: _ClassVar[ScheduleKind]
    STEP: _ClassVar[ScheduleKind]
    COSINE: _ClassVar[ScheduleKind]

class Split(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_UNSPECIFIED: _ClassVar[Split]
    ALL: _ClassVar[Split]
    TRAIN: _ClassVar[Split]
    HOLDOUT: _ClassVar[Split]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT64: DType
MODEL_UNSPECIFIED: Model
LINEAR: Model
LOGISTIC: Model
SOFTMAX: Model
MLP: Model
ACTIVATION_UNSPECIFIED: Activation
RELU: Activation
TANH: Activation
PLACEMENT_UNSPECIFIED: Placement
PACK: Placement
SPREAD: Placement
STRICT_SPREAD: Placement
OPTIMIZER_UNSPECIFIED: OptimizerKind
SGD: OptimizerKind
MOMENTUM: OptimizerKind
ADAM: OptimizerKind
ADAMW: OptimizerKind
SCHEDULE_UNSPECIFIED: ScheduleKind
CONSTANT: ScheduleKind
STEP: ScheduleKind
COSINE: ScheduleKind
SPLIT_UNSPECIFIED: Split
ALL: Split
TRAIN: Split
HOLDOUT: Split

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SyntheticData(_message.Message):
    __slots__ = ("rows", "features", "outputs")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    features: int
    outputs: int
    def __init__(self, rows: _Optional[int] = ..., features: _Optional[int] = ..., outputs: _Optional[int] = ...) -> None: ...

class DataSource(_message.Message):
    __slots__ = ("synthetic", "npz_path", "dataset_id", "classes")
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    NPZ_PATH_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    synthetic: SyntheticData
    npz_path: str
    dataset_id: str
    classes: int
    def __init__(self, synthetic: _Optional[_Union[SyntheticData, _Mapping]] = ..., npz_path: _Optional[str] = ..., dataset_id: _Optional[str] = ..., classes: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("model", "hidden", "activation", "shards", "dtype", "seed", "learning_rate", "batch_size", "l2", "data", "cpus_per_shard", "optimizer", "schedule", "clip_norm", "holdout_fraction", "placement", "checkpoint_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: Model
    hidden: int
    activation: Activation
    shards: int
    dtype: DType
    seed: int
    learning_rate: float
    batch_size: int
    l2: float
    data: DataSource
    cpus_per_shard: float
    optimizer: Optimizer
    schedule: Schedule
    clip_norm: float
    holdout_fraction: float
    placement: Placement
    checkpoint_every: int
    def __init__(self, model: _Optional[_Union[Model, str]] = ..., hidden: _Optional[int] = ..., activation: _Optional[_Union[Activation, str]] = ..., shards: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., seed: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., l2: _Optional[float] = ..., data: _Optional[_Union[DataSource, _Mapping]] = ..., cpus_per_shard: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., clip_norm: _Optional[float] = ..., holdout_fraction: _Optional[float] = ..., placement: _Optional[_Union[Placement, str]] = ..., checkpoint_every: _Optional[int] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("kind", "momentum", "nesterov", "beta1", "beta2", "eps", "weight_decay")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    momentum: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("kind", "warmup_steps", "step_size", "gamma", "total_steps", "min_lr")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    kind: ScheduleKind
    warmup_steps: int
    step_size: int
    gamma: float
    total_steps: int
    min_lr: float
    def __init__(self, kind: _Optional[_Union[ScheduleKind, str]] = ..., warmup_steps: _Optional[int] = ..., step_size: _Optional[int] = ..., gamma: _Optional[float] = ..., total_steps: _Optional[int] = ..., min_lr: _Optional[float] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "unit_begin", "unit_end", "param_begin", "param_end", "node_id", "step")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UNIT_BEGIN_FIELD_NUMBER: _ClassVar[int]
    UNIT_END_FIELD_NUMBER: _ClassVar[int]
    PARAM_BEGIN_FIELD_NUMBER: _ClassVar[int]
    PARAM_END_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    index: int
    unit_begin: int
    unit_end: int
    param_begin: int
    param_end: int
    node_id: str
    step: int
    def __init__(self, index: _Optional[int] = ..., unit_begin: _Optional[int] = ..., unit_end: _Optional[int] = ..., param_begin: _Optional[int] = ..., param_end: _Optional[int] = ..., node_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "model", "hidden", "activation", "dtype", "seed", "learning_rate", "batch_size", "l2", "n_params", "rows", "features", "outputs", "step", "tensors", "shards", "data", "cpus_per_shard", "optimizer", "schedule", "clip_norm", "holdout_fraction", "holdout_rows", "train_rows", "error", "placement", "checkpoint_every", "checkpoint_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    N_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: Model
    hidden: int
    activation: Activation
    dtype: DType
    seed: int
    learning_rate: float
    batch_size: int
    l2: float
    n_params: int
    rows: int
    features: int
    outputs: int
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    data: DataSource
    cpus_per_shard: float
    optimizer: Optimizer
    schedule: Schedule
    clip_norm: float
    holdout_fraction: float
    holdout_rows: int
    train_rows: int
    error: str
    placement: Placement
    checkpoint_every: int
    checkpoint_step: int
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[_Union[Model, str]] = ..., hidden: _Optional[int] = ..., activation: _Optional[_Union[Activation, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., seed: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., l2: _Optional[float] = ..., n_params: _Optional[int] = ..., rows: _Optional[int] = ..., features: _Optional[int] = ..., outputs: _Optional[int] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., data: _Optional[_Union[DataSource, _Mapping]] = ..., cpus_per_shard: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., clip_norm: _Optional[float] = ..., holdout_fraction: _Optional[float] = ..., holdout_rows: _Optional[int] = ..., train_rows: _Optional[int] = ..., error: _Optional[str] = ..., placement: _Optional[_Union[Placement, str]] = ..., checkpoint_every: _Optional[int] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("job_id", "flat")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FLAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    flat: bool
    def __init__(self, job_id: _Optional[str] = ..., flat: _Optional[bool] = ...) -> None: ...

class SetParametersRequest(_message.Message):
    __slots__ = ("job_id", "chunk")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    chunk: TensorChunk
    def __init__(self, job_id: _Optional[str] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rows: _Optional[_Iterable[int]] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("job_id", "batch", "flat", "parameters")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FLAT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    batch: Batch
    flat: bool
    parameters: TensorChunk
    def __init__(self, job_id: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., flat: _Optional[bool] = ..., parameters: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GetGradientRequest(_message.Message):
    __slots__ = ("job_id", "flat")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FLAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    flat: bool
    def __init__(self, job_id: _Optional[str] = ..., flat: _Optional[bool] = ...) -> None: ...

class GradientSummary(_message.Message):
    __slots__ = ("loss", "grad_norm", "rows", "step", "shard_seconds", "applied_step", "clip_scale")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    CLIP_SCALE_FIELD_NUMBER: _ClassVar[int]
    loss: float
    grad_norm: float
    rows: int
    step: int
    shard_seconds: _containers.RepeatedScalarFieldContainer[float]
    applied_step: int
    clip_scale: float
    def __init__(self, loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., rows: _Optional[int] = ..., step: _Optional[int] = ..., shard_seconds: _Optional[_Iterable[float]] = ..., applied_step: _Optional[int] = ..., clip_scale: _Optional[float] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("summary", "chunk")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    summary: GradientSummary
    chunk: TensorChunk
    def __init__(self, summary: _Optional[_Union[GradientSummary, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("job_id", "steps", "learning_rate", "expected_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    steps: int
    learning_rate: float
    expected_step: int
    def __init__(self, job_id: _Optional[str] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., expected_step: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "loss", "grad_norm", "seconds", "shard_seconds", "bytes_to_shards", "bytes_from_shards", "batch_rows", "epoch", "learning_rate", "clip_scale")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CLIP_SCALE_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad_norm: float
    seconds: float
    shard_seconds: _containers.RepeatedScalarFieldContainer[float]
    bytes_to_shards: int
    bytes_from_shards: int
    batch_rows: int
    epoch: int
    learning_rate: float
    clip_scale: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., seconds: _Optional[float] = ..., shard_seconds: _Optional[_Iterable[float]] = ..., bytes_to_shards: _Optional[int] = ..., bytes_from_shards: _Optional[int] = ..., batch_rows: _Optional[int] = ..., epoch: _Optional[int] = ..., learning_rate: _Optional[float] = ..., clip_scale: _Optional[float] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("job_id", "steps", "epochs", "eval_every", "learning_rate", "expected_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    steps: int
    epochs: int
    eval_every: int
    learning_rate: float
    expected_step: int
    def __init__(self, job_id: _Optional[str] = ..., steps: _Optional[int] = ..., epochs: _Optional[int] = ..., eval_every: _Optional[int] = ..., learning_rate: _Optional[float] = ..., expected_step: _Optional[int] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("report", "total_steps", "examples_per_second", "eval_loss", "eval_accuracy")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    report: StepReport
    total_steps: int
    examples_per_second: float
    eval_loss: float
    eval_accuracy: float
    def __init__(self, report: _Optional[_Union[StepReport, _Mapping]] = ..., total_steps: _Optional[int] = ..., examples_per_second: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("name", "classes", "chunk")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    name: str
    classes: int
    chunk: TensorChunk
    def __init__(self, name: _Optional[str] = ..., classes: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("dataset_id", "name", "rows", "features", "bytes", "label_dtype")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LABEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    name: str
    rows: int
    features: int
    bytes: int
    label_dtype: str
    def __init__(self, dataset_id: _Optional[str] = ..., name: _Optional[str] = ..., rows: _Optional[int] = ..., features: _Optional[int] = ..., bytes: _Optional[int] = ..., label_dtype: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("job_id", "batch", "split")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    batch: Batch
    split: Split
    def __init__(self, job_id: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., split: _Optional[_Union[Split, str]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("loss", "accuracy", "rows", "step")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    rows: int
    step: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., rows: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("step", "durable")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    step: int
    durable: bool
    def __init__(self, step: _Optional[int] = ..., durable: _Optional[bool] = ...) -> None: ...

class CheckGradientRequest(_message.Message):
    __slots__ = ("job_id", "coords_per_shard", "indices", "h", "seed", "batch", "worst")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COORDS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WORST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    coords_per_shard: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    h: float
    seed: int
    batch: Batch
    worst: int
    def __init__(self, job_id: _Optional[str] = ..., coords_per_shard: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., h: _Optional[float] = ..., seed: _Optional[int] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., worst: _Optional[int] = ...) -> None: ...

class CheckedCoordinate(_message.Message):
    __slots__ = ("index", "tensor", "tensor_index", "analytic", "numeric", "abs_error", "rel_error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    ANALYTIC_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    tensor: str
    tensor_index: _containers.RepeatedScalarFieldContainer[int]
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float
    def __init__(self, index: _Optional[int] = ..., tensor: _Optional[str] = ..., tensor_index: _Optional[_Iterable[int]] = ..., analytic: _Optional[float] = ..., numeric: _Optional[float] = ..., abs_error: _Optional[float] = ..., rel_error: _Optional[float] = ...) -> None: ...

class ShardCheck(_message.Message):
    __slots__ = ("shard", "checked", "max_abs_error", "max_rel_error", "worst", "seconds")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    WORST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    checked: int
    max_abs_error: float
    max_rel_error: float
    worst: _containers.RepeatedCompositeFieldContainer[CheckedCoordinate]
    seconds: float
    def __init__(self, shard: _Optional[int] = ..., checked: _Optional[int] = ..., max_abs_error: _Optional[float] = ..., max_rel_error: _Optional[float] = ..., worst: _Optional[_Iterable[_Union[CheckedCoordinate, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class CheckGradientResponse(_message.Message):
    __slots__ = ("loss", "h", "shards", "max_abs_error", "max_rel_error", "checked")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    loss: float
    h: float
    shards: _containers.RepeatedCompositeFieldContainer[ShardCheck]
    max_abs_error: float
    max_rel_error: float
    checked: int
    def __init__(self, loss: _Optional[float] = ..., h: _Optional[float] = ..., shards: _Optional[_Iterable[_Union[ShardCheck, _Mapping]]] = ..., max_abs_error: _Optional[float] = ..., max_rel_error: _Optional[float] = ..., checked: _Optional[int] = ...) -> None: ...
