"""Few-shot task data: examples, tasks, episodes; their rendering into token ids; the pocket task suite;
Super-NaturalInstructions, P3 (promptsource) and Symbol Tuning formats; SNI metrics.

    episodes  Example, Task, Episode, EpisodeSampler, JSONL and HF `datasets` interop
    render    RenderFormat (VERBOSE, COMPACT), render_hyper_input / downstream / icl / gisting, collate
    pocket    the synthetic suite in data/pocket: generator, writer, loader, tokenizer, corpus
    sni       Super-NaturalInstructions task files, splits, Tk-Instruct prompt
    p3        promptsource templates on raw SuperGLUE / ANLI rows
    symbol    symbol-tuning episodes from classification data
    csvfile   CSV classification files in the AG News layout (label index, text columns, classes file)
    metrics   exact match and ROUGE-L, best over references
    files     shared data folder, DataError, LoadReport
"""

from .csvfile import read_ag_news, read_csv_classification
from .episodes import (
    Episode,
    EpisodeSampler,
    Example,
    Task,
    load_tasks_jsonl,
    sample_episode,
    save_rows_jsonl,
    save_tasks_jsonl,
    tasks_from_dataset,
    tasks_from_rows,
    tasks_to_dataset,
    tasks_to_rows,
)
from .files import DataError, LoadReport, shared_data_dir
from .metrics import exact_match, normalize_answer, rouge_l, score_predictions
from .pocket import (
    generate_pocket_suite,
    hyperpretraining_corpus,
    load_pocket_corpus,
    load_pocket_suite,
    pocket_tokenizer,
    write_pocket_suite,
)
from .render import (
    COMPACT,
    IGNORE,
    VERBOSE,
    RenderFormat,
    answer_ids,
    choice_ids,
    collate,
    render_downstream,
    render_downstream_prompt,
    render_gisting,
    render_gisting_prompt,
    render_hyper_input,
    render_icl,
    render_icl_prompt,
)

__all__ = [
    "COMPACT",
    "IGNORE",
    "VERBOSE",
    "DataError",
    "Episode",
    "EpisodeSampler",
    "Example",
    "LoadReport",
    "RenderFormat",
    "Task",
    "answer_ids",
    "choice_ids",
    "collate",
    "exact_match",
    "generate_pocket_suite",
    "hyperpretraining_corpus",
    "load_pocket_corpus",
    "load_pocket_suite",
    "load_tasks_jsonl",
    "normalize_answer",
    "pocket_tokenizer",
    "render_downstream",
    "render_downstream_prompt",
    "render_gisting",
    "render_gisting_prompt",
    "render_hyper_input",
    "render_icl",
    "render_icl_prompt",
    "read_ag_news",
    "read_csv_classification",
    "rouge_l",
    "sample_episode",
    "save_rows_jsonl",
    "save_tasks_jsonl",
    "score_predictions",
    "shared_data_dir",
    "tasks_from_dataset",
    "tasks_from_rows",
    "tasks_to_dataset",
    "tasks_to_rows",
    "write_pocket_suite",
]
