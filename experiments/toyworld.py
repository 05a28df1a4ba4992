"""Helpers of the study that read the toy world (toy/world.json): which objects a caption names (CHAIR's
rule over the world's object names and plurals, scoring.Chair), whether a caption is well formed, and
hallucination statistics that separate the prior's errors (the absent partner of a present trigger) from
other absent objects (scoring.hallucination_rates)."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scoring  # noqa: E402


class World:
    def __init__(self, path):
        with open(path) as f:
            w = json.load(f)
        self.objects, self.plurals, self.partners = w["objects"], w["plurals"], w["partners"]
        self.numbers, self.colours, self.positions = w["numbers"], w["colours"], w["positions"]
        self.images = w["images"]  # name -> {split, caption, objects}
        self.describe_prompts = w["describe_prompts"]
        self.chair = scoring.Chair(scoring.synonym_table("\n".join(f"{o}, {self.plurals[o]}" for o in self.objects)))
        alt = lambda xs: "|".join(re.escape(x) for x in xs)
        one = (rf"there is an? (?:{alt(self.objects)}) at the (?:{alt(self.positions)}) , "
               rf"it is (?:{alt(self.colours)}) \.")
        many = (rf"there are (?:{alt(self.numbers[2:])}) (?:{alt(self.plurals.values())}) at the "
                rf"(?:{alt(self.positions)}) , they are (?:{alt(self.colours)}) \.")
        self._caption = re.compile(rf"(?:(?:{one}|{many}) ?)+")

    def well_formed(self, text):
        """Parses as a caption of the world's grammar: one or more complete object clauses."""
        return self._caption.fullmatch(" ".join(text.split())) is not None

    def mentioned(self, text):
        return self.chair.classes(text)

    def lures(self, truth):
        """Absent partners of present triggers: where the language prior pulls."""
        return {self.partners[t] for t in truth if t in self.partners} - set(truth)

    def stats(self, captions, truths):
        """CHAIR_s / CHAIR_i analogues (over the objects each caption names, each once), recall, objects per
        caption, partner vs other absent rate (fractions), share of well-formed captions. truths: list of sets
        of present objects."""
        counts = scoring.sum_counts([scoring.hallucination_counts(sorted(self.mentioned(cap)), truth,
                                                                  self.lures(truth), self.objects)
                                     for cap, truth in zip(captions, truths)])
        rates = scoring.hallucination_rates(counts, scale=1)
        n = max(1, len(captions))
        return {**{k: rates[k] for k in ("chair_s", "chair_i", "recall", "objects_per_caption", "partner_rate",
                                         "other_absent_rate")},
                "well_formed": sum(map(self.well_formed, captions)) / n, "n": len(captions)}
