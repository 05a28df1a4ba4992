"""Helpers of the study that read the toy world (toy/world.json): which objects a caption names,
whether a caption is well formed, and hallucination statistics that separate the prior's errors
(the absent partner of a present trigger) from other absent objects."""
import json
import re


class World:
    def __init__(self, path):
        with open(path) as f:
            w = json.load(f)
        self.objects, self.plurals, self.partners = w["objects"], w["plurals"], w["partners"]
        self.numbers, self.colours, self.positions = w["numbers"], w["colours"], w["positions"]
        self.images = w["images"]  # name -> {split, caption, objects}
        self.describe_prompts = w["describe_prompts"]
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
        ws = set(re.findall(r"\w+", text.lower()))
        return {o for o in self.objects if o in ws or self.plurals[o] in ws}

    def lures(self, truth):
        """Absent partners of present triggers: where the language prior pulls."""
        return {self.partners[t] for t in truth if t in self.partners} - set(truth)

    def stats(self, captions, truths):
        """CHAIR_s / CHAIR_i analogues, recall, objects per caption, partner vs other absent rate,
        share of well-formed captions. truths: list of sets of present objects."""
        hal = hal_i = mentions = partner = partner_n = other = other_n = rec = rec_n = wf = 0
        for cap, truth in zip(captions, truths):
            truth, said = set(truth), self.mentioned(cap)
            hal += bool(said - truth)
            hal_i, mentions = hal_i + len(said - truth), mentions + len(said)
            rec, rec_n = rec + len(said & truth), rec_n + len(truth)
            lures = self.lures(truth)
            others = set(self.objects) - truth - lures
            partner, partner_n = partner + len(said & lures), partner_n + len(lures)
            other, other_n = other + len(said & others), other_n + len(others)
            wf += self.well_formed(cap)
        n = max(1, len(captions))
        return {"chair_s": hal / n, "chair_i": hal_i / max(1, mentions), "recall": rec / max(1, rec_n),
                "objects_per_caption": mentions / n, "partner_rate": partner / max(1, partner_n),
                "other_absent_rate": other / max(1, other_n), "well_formed": wf / n, "n": len(captions)}
