"""The default downstream tasks: what each one is, its labels, and where `pmp.data.prepare` puts its files.

Kept apart from the task loaders, so that the cache layout (`pmp.data.cache`) and the builder of the task files
can name the tasks without importing the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # 'classification' | 'lm'
    description: str
    label_names: tuple[str, ...] = ()
    default: bool = False  # part of default_classification_tasks() / default_lm_probe()
    verbalisers: tuple[str, ...] = ()  # the words that name each label when the task is read as language modelling
    # (`TASK:lm`, pmp/data/task_formulations.py); empty = the label names themselves

    @property
    def subdir(self) -> str:
        return "tasks" if self.kind == "classification" else "lm_probe"


TASKS: dict[str, TaskSpec] = {
    "movie_sentiment": TaskSpec("classification", "movie-review sentence sentiment (Hutto & Gilbert 2014), "
                                "negative/positive, neutral dropped", ("negative", "positive"), default=True),
    "trec": TaskSpec("classification", "TREC question type, 6 coarse classes",
                     ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), default=True,
                     verbalisers=("abbreviation", "description", "entity", "human", "location", "number")),
    "sms_spam": TaskSpec("classification", "SMS spam vs ham (an easy sanity task)", ("ham", "spam"), default=True),
    "tweet_sentiment": TaskSpec("classification", "tweet sentiment (Hutto & Gilbert 2014), negative/positive",
                                ("negative", "positive"), default=True),
    "amazon_sentiment": TaskSpec("classification", "Amazon review sentence sentiment (Hutto & Gilbert 2014)",
                                 ("negative", "positive")),
    "movie_dialog": TaskSpec("lm", "Cornell movie dialogs: held-out LM domain for a perplexity probe", default=True),
}
