"""A deterministic GVM teacher for the local OpenAI-compatible test server.

It answers the Fig. 9 (generate), template-guided (recommend) and Fig. 10 (mine) prompts the
way a teacher might: several reasoning styles, some of which recommend well, and a share of
malformed answers (missing or repeated tags, too few items, angle brackets in item text).
Whether a style "recommends well" is simulated with an oracle the test builds from the
warehouse (history titles -> the validation item's text), so a test can check that Mine
finds the style that works. Every answer is a function of the request body, including its
`seed`, so a parse-retry draw (new seed) gets a new answer and a re-run gets the same one::

    teacher = GvmTeacher(oracle, malformed=0.2)
    with OpenAIServer(teacher) as server: ...
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

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


def _draw(*parts: Any) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class GvmTeacher:
    """Responder for OpenAIServer. `oracle`: history titles -> text of the held-out item."""

    oracle: dict[tuple[str, ...], str] = field(default_factory=dict)
    malformed: float = 0.0
    #: template-guided prompts: hit chance per first step (default 0.3)
    template_quality: dict[str, float] = field(default_factory=dict)
    n_items: int = 20

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        seed = body.get("seed", 0)
        if "Analyze the following CoT cluster" in prompt:
            return self._mine(prompt, seed)
        titles = history_titles(prompt)
        given = re.search(r"Reasoning path to follow:\s*<cot_path>(.*?)</cot_path>", prompt)
        if given:
            path = given.group(1).strip()
            quality = self.template_quality.get(path.split(" -> ")[0], 0.3)
        else:
            path, quality = STYLES[int(_draw("style", seed, titles) * len(STYLES))]
        items = [describe(i, titles[i % len(titles)]) for i in range(self.n_items)]
        target = self.oracle.get(titles)
        if target is not None and _draw("hit", seed, titles) < quality:
            items[int(_draw("rank", seed, titles) * len(items))] = target
        answer = self._format(path, items)
        if _draw("malformed", seed, titles) < self.malformed:
            return self._break(answer, path, items, _draw("how", seed, titles))
        return answer

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

    def _mine(self, prompt: str, seed: int) -> str:
        paths = re.findall(r"<cot_path>(.*?)</cot_path>", prompt)
        if not paths or _draw("mine-malformed", seed, prompt) < self.malformed:
            return "### 1. Pattern Summary\n- Core Logic: unclear.\n"          # no Best Path
        steps = paths[0].split(" -> ")
        best = " -> ".join([*steps[:-1], "Item Recommendation"])
        return (f"### 1. Pattern Summary\n- **Core Logic:** {steps[0]} first.\n"
                "### 2. Performance Assessment\n- **Why it works:** category signal.\n"
                "### 3. Optimized Paths\n"
                "- **Best Path (each step <= 8 words):** [" + best + "]\n"
                "- **Improvement Logic:** ends with an explicit recommendation step.\n")
