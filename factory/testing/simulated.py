"""A simulated teacher: answers every prompt of `prompts/` in its paper's format.

Real teachers are slow, paid and unavailable offline, and the embedded SmolLM2 rarely follows
the papers' formats, so without this the teacher half of the factory could not be tried or
tested end to end. Each answerer below reads only the request (the prompt and the `seed` the
engine sends per sample and per re-draw), so answers are deterministic and a re-draw gets a
new one. They are written to make each job do real work: some answers are wrong, malformed,
too short or refused, so filters, re-draws and reflect turns all happen.

Under a JSON schema (`response_format`, `--structured`) each answerer whose prompt declares a
shape (prompts/<name>.answer.json) answers the same content as a conforming JSON object, as a
constrained decoder would; its share of bad answers are then answers that fit the schema and
that the job's parser still rejects (a placeholder path, a decision its analysis contradicts).

`SimulatedTeacher` recognises the prompt and dispatches to the matching answerer; it is the
responder of `factory testing serve`. Tests use the single answerers directly::

    from factory.testing.simulated import SimulatedTeacher, MODEL_ID
    with OpenAIServer(SimulatedTeacher(), model_ids=(MODEL_ID,)) as server: ...

Every answer of `SimulatedTeacher` carries the model id `simulated-teacher`, so no row it
produced can be mistaken for a real teacher's.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.testing.openai_server import MALFORMED_CONTENT, asked_schema

#: the only model id the simulated server answers to
MODEL_ID = "simulated-teacher"


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def _draw(*parts: Any) -> float:
    """A uniform number in [0, 1) fixed by `parts`."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8],
                          "big") / 2**64


def _prompt(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


# -- ThinkRec (App. B.3): first turn and reflect turns ---------------------------------------
REVEAL = re.compile(r"^The (?:correct|accurate|right) (?:response|answer) is (Yes|No)\. ")


def thinkrec_teacher(body: dict[str, Any]) -> str:
    """First turn: Yes or No by a hash (right about half the time). Reflect turns: follow
    the revealed label, except stubborn instances that never do. Some answers malformed."""
    msgs = body["messages"]
    first = msgs[0]["content"]
    h = _digest(first, len(msgs), body.get("seed", 0))
    structured = asked_schema(body) is not None
    if h[0] % 6 == 0:
        return json.dumps({"decision": "Yes", "analysis": "On reflection the answer is No."}) \
            if structured else MALFORMED_CONTENT
    target = first.rsplit("titled ", 1)[1].split("?", 1)[0]
    if len(msgs) == 1:
        answer = "Yes" if h[1] % 2 else "No"
    else:
        revealed = REVEAL.match(msgs[-1]["content"]).group(1)  # type: ignore[union-attr]
        stubborn = hashlib.sha256(first.encode()).digest()[0] % 5 == 0
        answer = ("No" if revealed == "Yes" else "Yes") if stubborn else revealed
    analysis = (f"The history suggests the user {'likes' if answer == 'Yes' else 'dislikes'}"
                f" films like {target}, judging by the genres of the rated titles.")
    if structured:
        return json.dumps({"decision": answer, "analysis": analysis})
    return f"{answer}. {analysis}"


def thinkrec_recommendation(body: dict[str, Any]) -> str:
    """B.2's recommendation prompt (exports, not a teacher job): a bare Yes or No."""
    return "Yes." if _digest(_prompt(body), body.get("seed", 0))[0] % 2 else "No."


# -- ThinkRec keywords (App. B.1) -------------------------------------------------------------
def keyword_teacher(body: dict[str, Any]) -> str:
    """Comma-separated keywords with duplicates, case and bullets to normalise; malformed
    answers (re-drawn) for some seeds; never anything parseable for 'Heat'."""
    prompt = _prompt(body)
    title = prompt.split("Title: ", 1)[1].split("\n", 1)[0] if "Title: " in prompt \
        else prompt.split("\n", 1)[0]
    schema = asked_schema(body)
    words = [w.strip("(),.:") for w in title.split() if len(w) > 2][:3]
    keywords = ["Drama", "drama", *words, "* Family Film", "cinema", "movie", "story", "plot",
                "acting", "classic", "one", "two", "three", "four"]
    if title.startswith("Heat") or _digest(title, body.get("seed", 0))[0] % 4 == 0:
        keywords = [MALFORMED_CONTENT]      # under a schema: fits it, and still no keyword
    if schema is not None:
        return json.dumps({"keywords": _fit(keywords, schema["properties"]["keywords"])})
    return keywords[0] if keywords == [MALFORMED_CONTENT] else "Keywords: " + ", ".join(keywords)


def _fit(texts: list[str], schema: dict[str, Any]) -> list[str]:
    """A list of strings cut to an array schema's maxItems and its items' maxLength, as a
    constrained decoder would end them."""
    longest = schema.get("items", {}).get("maxLength")
    return [t[:longest] for t in texts][:schema.get("maxItems")]


# -- TwiSTAR I2I explanations (sec. 4.3, E.1.3) and RQ3 discrimination (6.3) ------------------
def explained_items(prompt: str) -> tuple[str, str]:
    """The two item texts of the TwiSTAR instruction."""
    head = prompt.split("In collaborative filtering, item ", 1)[1]
    a, rest = head.split(" and item ", 1)
    return a, rest.split(" are highly correlated", 1)[0]


def explain_teacher(body: dict[str, Any]) -> str:
    """Deterministic answers by pair and seed: a long explanation naming the items (twice as
    likely, so some pairs get it twice: a near-duplicate); one too short; a refusal; one that
    names neither item; malformed answers that must be re-drawn; and a reasoning block that
    never ends (truncated, never re-drawn)."""
    a, b = explained_items(_prompt(body))
    seed = body.get("seed", 0)
    kind = _digest(a, b, seed)[0] % 6
    long = (f"People who enjoy {a} often look for another film with a similar mood, and "
            f"{b} offers the same kind of story, pacing and characters, so viewers who "
            "liked the first one are very likely to pick the second one next as well.")
    if kind in (0, 1):
        return long if kind == 0 else f"<think>same mood</think>\n{long}"
    if kind == 2:
        return f"Both are good films like {a}."
    if kind == 3:
        return "I'm sorry, but I can't help with explaining purchases of these items."
    if kind == 4:
        return ("Users who like one thing tend to like similar things, because taste is "
                "consistent over time and recommendations reinforce that habit strongly "
                "across many different people and their viewing sessions.")
    return MALFORMED_CONTENT if seed % 2 else "<think>never finished"


def explain_kept_or_short(body: dict[str, Any]) -> str:
    """Half the samples kept (a long answer naming the items, worded per sample so no
    near-duplicate), half too short; no malformed answer, so nothing is re-drawn."""
    a, b = explained_items(_prompt(body))
    h = _digest(a, b, body["seed"])
    if h[0] % 2:
        return f"Both are films like {a}."
    topics = ["the soundtrack", "the director", "the decade", "the lead actor", "the genre",
              "the setting", "the humour", "the violence", "the awards", "the budget"]
    t = topics[h[1] % len(topics)]
    return (f"Sample {body['seed']}: viewers drawn to {a} care about {t}; {b} shares {t} "
            f"in a way that fans notice, so after finishing {a} many of them go on to {b} "
            "because it promises the same pleasure once more, and they rate both highly.")


def discriminate_teacher(body: dict[str, Any]) -> str:
    """The candidate sharing the longest prefix with the item (SID codes share prefixes for
    similar items, so this is a weak but real signal), ties broken by the seed."""
    prompt = _prompt(body)
    item = prompt.split("Here is item ", 1)[1].split("\n", 1)[0].rstrip(".")
    block = prompt.split("Candidates:", 1)[1].split("Which candidate", 1)[0]
    candidates = re.findall(r"^(\d+)\. (.*)$", block, re.M)
    if not candidates:
        return MALFORMED_CONTENT

    def shared(text: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(item, text, strict=False)) if x != y),
                    min(len(item), len(text)))

    best = max(candidates, key=lambda c: (shared(c[1]), _draw("pick", body.get("seed", 0), c)))
    return json.dumps({"candidate": int(best[0])}) if asked_schema(body) else best[0]


# -- describe-items (demonstration job) -------------------------------------------------------
def describe_teacher(body: dict[str, Any]) -> str:
    """One sentence from the title, categories and year in the prompt."""
    prompt = _prompt(body)
    title = re.search(r"^Title: (.*)$", prompt, re.M)
    cats = re.search(r"^Categories: (.*)$", prompt, re.M)
    year = re.search(r"^Year: (.*)$", prompt, re.M)
    kind = cats.group(1).lower() if cats else "catalogue"
    when = f" from {year.group(1)}" if year else ""
    sentence = (f"{title.group(1) if title else 'This item'} is a {kind} title{when} that "
                "viewers of similar items tend to enjoy.")
    return json.dumps({"sentence": sentence}) if asked_schema(body) else sentence


def alignment_teacher(body: dict[str, Any]) -> str:
    """SID/text alignment prompts (export-only): a plausible SID or text."""
    prompt = _prompt(body)
    if prompt.startswith("Which semantic ID"):
        h = _digest(prompt)
        return f"<|sid_begin|><s_a_{h[0]}><s_b_{h[1]}><s_c_{h[2]}><|sid_end|>"
    return "An item of the catalogue."


# -- SCoTER structured distillation (3.3.1, Fig. 11) ------------------------------------------
class ChainTeacher:
    """Writes Fig. 11 chains for the steps and the history it finds in the prompt; can be
    told to answer badly (`mode`)."""

    def __init__(self) -> None:
        self.mode = "good"  # good | swapped (steps 1 and 2 out of order) | same (fixed texts)

    @staticmethod
    def steps(prompt: str) -> list[str]:
        found = re.search(r"High-level Steps\):\*\* (.*)", prompt)
        assert found, "not a scoter_distill prompt"
        return found.group(1).split(" → ")

    @staticmethod
    def history(prompt: str) -> list[str]:
        return re.findall(r"^- Item \d+: (.*?)\.(?: Desc:|$)", prompt, re.M)

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = _prompt(body)
        steps, items = self.steps(prompt), self.history(prompt)
        texts = [f"Step {j + 1} looks at {items[-1 - j % len(items)]}." if self.mode != "same"
                 else f"The same thought number {j + 1}." for j in range(len(steps))]
        sections = list(zip(steps, texts, strict=True))
        if self.mode == "swapped":
            sections[0], sections[1] = sections[1], sections[0]
        overall, summary = f"{len(items)} items watched.", "more of the same."
        if asked_schema(body):      # the steps are implied by their position
            return json.dumps({"overall_analysis": overall,
                               "step_analyses": [text for _, text in sections],
                               "summary": summary})
        parts = [f"**Overall Analysis:** {overall}"]
        parts += [f"**{name}:** {text}" for name, text in sections]
        parts.append(f"**Summary:** {summary}")
        return "\n\n".join(parts)


# -- SCoTER Generate-Validate-Mine (3.2, Fig. 9-10) -------------------------------------------
#: (path, chance that the 20 items contain the oracle's item)
STYLES: tuple[tuple[str, float], ...] = (
    ("Review purchase history -> Find favourite category -> Recommend matching items", 0.8),
    ("Scan recent items -> Guess current mood -> Suggest popular picks", 0.1),
    ("List liked brands -> Match similar brands -> Propose new releases", 0.1),
)
_HISTORY_LINE = re.compile(r"^\d+\. (.*?)(?: \| categories: .*?)?(?: \| brand: .*)?$")


def history_titles(prompt: str) -> tuple[str, ...]:
    """The numbered history lines of a gvm_generate / gvm_recommend prompt."""
    block = prompt.split("oldest first):", 1)[-1].split("\n\n", 1)[0]
    return tuple(m.group(1) for m in map(_HISTORY_LINE.match, block.splitlines()) if m)


def describe(rank: int, title: str) -> str:
    """The filler recommendation at `rank` (angle brackets included on purpose)."""
    return f"Pick {rank}: something like {title} (size <XL>)"


#: per catalogue style, each step's wordings: a real teacher words one strategy many ways, and
#: GVM prunes near-identical paths (cosine >= 0.85), so identical paths would leave one
PATH_WORDINGS: dict[int, list[list[str]]] = {
    0: [
        ["Review {n} rated films", "Scan the {n} watched movies",
         "Read the viewing history", "Count genres over {n} films"],
        ["Find favourite genre: {g}", "Note the dominant {g} taste",
         "Identify {g} as core interest", "Detect a {g} preference"],
        ["Rank popular {g} titles", "Sort {g} films by popularity",
         "Pick crowd-pleasing {g} movies", "Favour well-loved {g} picks"],
        ["Recommend unseen hits", "Item recommendation",
         "Suggest the top unseen ones", "Recommend popular matches"],
    ],
    1: [
        ["Start from {last}", "Look at last film {last}",
         "Focus on recent {last}", "Take latest watch {last}"],
        ["Guess current mood", "Infer the present mood",
         "Estimate today's mood", "Read the recent mood"],
        ["Match {g2} genres", "Find films sharing {g2}",
         "Look for {g2} neighbours", "Match the {g2} feel"],
        ["Suggest similar titles", "Item recommendation",
         "Recommend lookalike films", "Propose close matches"],
    ],
    2: [
        ["List liked brands", "Gather favourite studios",
         "Collect liked labels", "Note preferred brands"],
        ["Browse the whole catalogue", "Sample the wider catalogue",
         "Explore random shelves", "Wander the full catalogue"],
        ["Propose new releases", "Item recommendation",
         "Suggest fresh arrivals", "Offer assorted picks"],
    ],
}


@dataclass(frozen=True)
class Catalogue:
    """One dataset's items as a teacher with world knowledge would know them: titles,
    categories and popularity (most popular first)."""

    titles: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]

    def describe(self, title: str) -> str:
        cats = self.categories.get(title, ())
        return f"{title} ({', '.join(cats)})" if cats else title

    def path(self, style: int, history: tuple[str, ...], seed: Any) -> str:
        """One wording of the style's reasoning path, with this history's details."""
        counts = Counter(c for t in history for c in self.categories.get(t, ()))
        last = history[-1] if history else "the last film"
        fill = {"n": len(history), "last": last.split(" (")[0],
                "g": counts.most_common(1)[0][0] if counts else "favourite",
                "g2": "/".join(self.categories.get(last, ())[:2]) or "similar"}
        return " -> ".join(
            options[int(_draw("wording", seed, history, style, i) * len(options))].format(**fill)
            for i, options in enumerate(PATH_WORDINGS[style]))

    def recommend(self, style: int, history: tuple[str, ...], n: int, seed: Any) -> list[str]:
        """Style 0: the most popular unseen titles of the history's favourite category (a
        real popularity-by-genre recommender, so it hits held-out items); 1: unseen titles
        sharing the last item's categories, in hash order; 2: any titles, in hash order."""
        seen = set(history)
        unseen = [t for t in self.titles if t not in seen]
        if style == 0:
            counts = Counter(c for t in history for c in self.categories.get(t, ()))
            favourite = counts.most_common(1)[0][0] if counts else None
            picks = [t for t in unseen if favourite in self.categories.get(t, ())]
        elif style == 1:
            last = set(self.categories.get(history[-1], ())) if history else set()
            picks = sorted((t for t in unseen if last & set(self.categories.get(t, ()))),
                           key=lambda t: _draw("mood", seed, t))
        else:
            picks = sorted(unseen, key=lambda t: _draw("any", seed, t))
        picks = (picks + [t for t in unseen if t not in set(picks)])[:n]
        return [self.describe(t) for t in picks]


@dataclass
class GvmTeacher:
    """Answers the Fig. 9 (generate), template-guided (recommend) and Fig. 10 (mine) prompts
    the way a teacher might: several reasoning styles, some of which recommend well, and a
    share of malformed answers (missing or repeated tags, too few items, angle brackets).

    How well a style recommends comes from an `oracle` a test builds from the warehouse
    (history titles -> the held-out item's text), or, for the served teacher, from a
    `catalogue` look-up (history titles -> the dataset's Catalogue), which recommends real
    unseen titles by category and popularity."""

    oracle: dict[tuple[str, ...], str] = field(default_factory=dict)
    malformed: float = 0.0
    #: template-guided prompts: hit chance per first step (default 0.3)
    template_quality: dict[str, float] = field(default_factory=dict)
    n_items: int = 20
    catalogue: Callable[[tuple[str, ...]], Catalogue | None] | None = None

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = _prompt(body)
        seed = body.get("seed", 0)
        schema = asked_schema(body)
        if "Analyze the following CoT cluster" in prompt:
            return self._mine(prompt, seed, structured=schema is not None)
        n_items = schema["properties"]["recommendations"]["maxItems"] if schema else self.n_items
        titles = history_titles(prompt)
        given = re.search(r"Reasoning path to follow:\s*<cot_path>(.*?)</cot_path>", prompt)
        if given:
            path = given.group(1).strip()
            quality = self.template_quality.get(path.split(" -> ")[0], 0.3)
            style = int(_draw("template", path) * len(STYLES))
        else:
            style = int(_draw("style", seed, titles) * len(STYLES))
            path, quality = STYLES[style]
        known = self.catalogue(titles) if self.catalogue is not None else None
        if known is not None:
            if not given:
                path = known.path(style, titles, seed)
            items = known.recommend(style, titles, n_items, (seed, titles))
        else:
            items = [describe(i, titles[i % len(titles)]) for i in range(n_items)]
            target = self.oracle.get(titles)
            if target is not None and _draw("hit", seed, titles) < quality:
                items[int(_draw("rank", seed, titles) * len(items))] = target
        broken = _draw("malformed", seed, titles) < self.malformed
        how = _draw("how", seed, titles)
        if schema is not None:
            return self._json(path, items, schema, how if broken else None)
        answer = self._format(path, items)
        return self._break(answer, path, items, how) if broken else answer

    @staticmethod
    def _json(path: str, items: list[str], schema: dict[str, Any], broken: float | None) -> str:
        """The answer as a constrained decoder gives it; `broken`: one of the bad answers
        that fit the schema: a placeholder path and placeholder items (both rejected), or a
        step longer than 8 words (a warning)."""
        steps = path.split(" -> ")
        if broken is not None:
            kind = int(broken * 3)
            if kind == 0:
                steps = ["Step 1", "Step 2", "Item recommendation"]
            elif kind == 1:
                items = [f"Detailed feature description of product {i + 1}"
                         for i in range(len(items))]
            else:
                steps = [*steps[:-1], "recommend what they will like next from all this"]
        props = schema["properties"]
        return json.dumps({"cot_path": _fit(steps, props["cot_path"]),
                           "reason": f"Following {path}, step by step.",
                           "recommendations": _fit(items, props["recommendations"])})

    @staticmethod
    def _format(path: str, items: list[str]) -> str:
        listed = "\n".join(f"<item>{d}</item>" for d in items)
        return (f"<cot_path>\n{path}\n</cot_path>\n<reason>\nFollowing {path}, step by step."
                f"\n</reason>\n<recommendations>\n{listed}\n</recommendations>")

    def _break(self, answer: str, path: str, items: list[str], how: float) -> str:
        """Malformed variants: fatal ones (no path, no items) and tolerable ones."""
        variants = [
            answer.split("</cot_path>", 1)[1],                           # no <cot_path>: fatal
            answer.split("<recommendations>", 1)[0],                     # no items: fatal
            self._format(path, items[:7]),                               # 7 items
            answer.replace("<cot_path>", "<cot_path><cot_path>", 1)      # nested, unclosed
                  .replace("</cot_path>", "", 1),
            "<reason>Reasons first.</reason>\n" + answer.split("<reason>", 1)[0]
            + answer.split("</reason>", 1)[1],                           # out of order
            "<cot_path>[Summarize the core reasoning path here: Step 1 -> Step 2]</cot_path>\n"
            + answer,                                                    # echoed format first
        ]
        return variants[int(how * len(variants))]

    def _mine(self, prompt: str, seed: int, structured: bool = False) -> str:
        paths = re.findall(r"<cot_path>(.*?)</cot_path>", prompt)
        bad = not paths or _draw("mine-malformed", seed, prompt) < self.malformed
        steps = paths[0].split(" -> ") if paths else []
        if structured:     # a placeholder Best Path fits the schema; the parser skips it
            best_path = ["Step1", "Step2"] if bad else [*steps[:-1], "Item Recommendation"]
            return json.dumps({
                "core_logic": f"{steps[0] if steps else 'Unclear'} first.",
                "key_steps": "category signal", "why_it_works": "category signal.",
                "limitations": "few steps.", "best_path": best_path,
                "improvement_logic": "ends with an explicit recommendation step."})
        if bad:
            return "### 1. Pattern Summary\n- Core Logic: unclear.\n"          # no Best Path
        best = " -> ".join([*steps[:-1], "Item Recommendation"])
        return (f"### 1. Pattern Summary\n- **Core Logic:** {steps[0]} first.\n"
                "### 2. Performance Assessment\n- **Why it works:** category signal.\n"
                "### 3. Optimized Paths\n"
                "- **Best Path (each step <= 8 words):** [" + best + "]\n"
                "- **Improvement Logic:** ends with an explicit recommendation step.\n")


class WarehouseCatalogue:
    """Catalogues read from a warehouse file (read-only, on first need, and again at most
    every few seconds when a history matches no dataset read so far), so the served teacher
    can recommend real titles for whichever dataset a job sends."""

    def __init__(self, path: str | Path, reload_s: float = 5.0) -> None:
        self.path = Path(path)
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._catalogues: dict[str, Catalogue] = {}
        self._index: dict[str, set[str]] = {}

    def __call__(self, titles: tuple[str, ...]) -> Catalogue | None:
        with self._lock:
            found = self._best(titles)
            if found is None and time.monotonic() - self._loaded_at > self.reload_s:
                self._load()
                found = self._best(titles)
            return found

    def _best(self, titles: tuple[str, ...]) -> Catalogue | None:
        if not titles:
            return None
        score, name = max(((sum(t in known for t in titles), name)
                           for name, known in self._index.items()), default=(0, ""))
        return self._catalogues[name] if score * 2 > len(titles) else None

    def _load(self) -> None:
        from factory.warehouse import Warehouse

        self._loaded_at = time.monotonic()
        if not self.path.exists():
            return
        with Warehouse(self.path, reader=True).read() as con:
            rows = con.execute(
                "select i.dataset, coalesce(i.title, i.item_id), i.categories,"
                " count(p.item_id) as n from items i left join split_interactions p"
                " on p.dataset = i.dataset and p.item_id = i.item_id and p.split = 'loo'"
                " and p.part = 'train' group by all order by i.dataset, n desc, 2").fetchall()
        by_dataset: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for dataset, title, cats, _ in rows:
            by_dataset.setdefault(dataset, []).append((title, tuple(cats or ())))
        self._catalogues = {d: Catalogue(tuple(t for t, _ in items), dict(items))
                            for d, items in by_dataset.items()}
        self._index = {d: set(c.titles) for d, c in self._catalogues.items()}


# -- the dispatcher ---------------------------------------------------------------------------
Answerer = Callable[[dict[str, Any]], "str | dict[str, Any]"]


@dataclass
class SimulatedTeacher:
    """Responder for OpenAIServer that recognises each prompt of `prompts/` by its wording
    and answers it in its paper's format; anything else gets one plain sentence."""

    catalogue: Callable[[tuple[str, ...]], Catalogue | None] | None = None
    gvm_malformed: float = 0.1
    model_id: str = MODEL_ID

    def __post_init__(self) -> None:
        gvm = GvmTeacher(malformed=self.gvm_malformed, catalogue=self.catalogue)
        #: (text the prompt contains, answerer, prompt file it belongs to); first match wins
        self.routes: list[tuple[str, Answerer, str]] = [
            ("make a prediction about whether the user would enjoy", thinkrec_teacher,
             "thinkrec_first_turn / thinkrec_reflect"),
            ("#Question: A user has given ratings", thinkrec_recommendation,
             "thinkrec_recommendation"),
            ("extract up to ten keywords", keyword_teacher, "thinkrec_keywords"),
            ("Analyze the following CoT cluster", gvm, "gvm_mine"),
            ("product features that the user may be interested", gvm,
             "gvm_generate / gvm_recommend"),
            ("**Reasoning Pattern (High-level Steps):**", ChainTeacher(), "scoter_distill"),
            ("are highly correlated. Please explain why", explain_teacher,
             "twistar_i2i_explain"),
            ("Which candidate is most collaboratively similar", discriminate_teacher,
             "twistar_i2i_discriminate"),
            ("Describe the following item in exactly one sentence", describe_teacher,
             "describe_item"),
            ("Which semantic ID has the item", alignment_teacher, "twistar_align_text_to_sid"),
            ("Describe the item <|sid_begin|>", alignment_teacher, "twistar_align_sid_to_text"),
        ]

    def route(self, body: dict[str, Any]) -> tuple[Answerer, str] | None:
        """The answerer for a request: ThinkRec conversations by their first turn, the rest
        by the last message."""
        first = str(body["messages"][0]["content"]) if body.get("messages") else ""
        text = first + "\n" + _prompt(body)
        for marker, answerer, name in self.routes:
            if marker in text:
                return answerer, name
        return None

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        found = self.route(body)
        if found is None:
            content: str | dict[str, Any] = (
                "ready" if "single word: ready" in _prompt(body)
                else "This is the simulated teacher; it only speaks the factory's prompts.")
        else:
            content = found[0](body)
        answer = {"content": content} if isinstance(content, str) else dict(content)
        answer["model"] = self.model_id
        return answer
