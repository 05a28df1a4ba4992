"""Every scoring rule, once, as pure functions: CHAIR (object mentions through a synonym table, and the
hallucination rates of Object HalBench and of the toy world's prior check), POPE's yes/no rule and
metrics, MM-Vet's offline exact judge and capability scores, LLaVA-Bench's score line, offline overlap
judge and relative score, and the mean and spread over runs. 04-07, 00_make_toy.py and experiments/
import them from here."""
import functools
import math
import re
import statistics

from dist_io import DataError, read_utf8

# ----------------------------------------------------------------------------- CHAIR: which objects a text names

# phrases whose words name no object here (a home plate is no plate, a bus stop no bus)
NOT_OBJECTS = {("home", "plate"), ("train", "track"), ("train", "station"), ("bus", "stop"), ("baseball", "cap"),
               ("baseball", "field"), ("baseball", "game"), ("baseball", "diamond"), ("baseball", "uniform"),
               ("tennis", "court"), ("football", "field"), ("soccer", "field")}
MODIFIERS = {"baby", "adult", "passenger"}  # "baby elephant" is an elephant; "baby" alone is a person


def synonym_table(text, path="synonyms"):
    """{phrase as a tuple of words: class} from lines `class, synonym, ...` (the class names itself), the
    published tables (CHAIR's, RLHF-V's synonyms_refine.txt) as they are: an entry twice in its class is
    one entry, and case is kept, as CHAIR keeps it (it lower-cases the text, not the table, so RLHF-V's
    `iPhone` never matches). DataError naming path:line for an empty entry or a synonym of two classes."""
    table = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        names = [" ".join(n.split()) for n in line.split(",")]
        if not all(names):
            raise DataError(f"{path}:{line_no}: expected 'class, synonym, ...' (an entry is empty)")
        for n in names:
            if table.get(tuple(n.split()), names[0]) != names[0]:
                raise DataError(f"{path}:{line_no}: {n!r} is already a synonym of {table[tuple(n.split())]!r}")
            table[tuple(n.split())] = names[0]
    return table


def read_synonyms(path):
    return synonym_table(read_utf8(path), path)


@functools.lru_cache(maxsize=None)
def singular(word):
    return _inflect().singular_noun(word) or word


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect
    return inflect.engine()


class Chair:
    """CHAIR's object finder over a synonym table: the lower-cased text's words (letters, a hyphen inside a
    word keeps it whole, as CHAIR's nltk tokeniser does: "man-made" names no man) -> singular (unless the
    table knows the word: "bus" stays) -> the longest known phrase first -> its class. `unknown` collects the
    ground-truth names the table does not know (they can be neither hallucinated nor recalled)."""

    def __init__(self, table):
        self.table = table
        self.vocab = {w for phrase in list(table) + list(NOT_OBJECTS) for w in phrase}  # never singularised
        self.longest = max(len(phrase) for phrase in list(table) + list(NOT_OBJECTS))
        self.unknown = set()

    def mentions(self, text):
        """(phrase, class) of every object mention in the text, in order; a repeated mention counts again."""
        words = [w if w in self.vocab else singular(w) for w in re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())]

        def match(i):  # (length, class or None) of the longest phrase starting at word i
            for n in range(min(self.longest, len(words) - i), 0, -1):
                phrase = tuple(words[i:i + n])
                if phrase in self.table or phrase in NOT_OBJECTS:
                    return n, self.table.get(phrase)
            return None

        found, i = [], 0
        while i < len(words):
            m = match(i)
            if m is None:
                i += 1
                continue
            if words[i] in MODIFIERS and m[0] == 1 and (match(i + 1) or (0, None))[1]:
                i += 1  # a modifier of the object that follows
                continue
            if m[1]:
                found.append((" ".join(words[i:i + m[0]]), m[1]))
            i += m[0]
        if any(c == "toilet" for _, c in found):  # "the seat of the toilet" names no chair
            found = [(w, c) for w, c in found if w != "seat"]
        return found

    def classes(self, text):
        """The classes a text names, each once."""
        return {c for _, c in self.mentions(text)}

    def classes_of(self, name):
        """The classes a ground-truth name stands for (a name the table does not know goes to `unknown`)."""
        found = self.classes(name)
        if not found:
            self.unknown.add(name)
        return found


# ----------------------------------------------------------------------------- CHAIR: hallucination rates

# per response: object mentions (a repeat counts again), those not in the image, whether any is not, whether
# it names an object at all, the present classes it names, the classes present, the absent partners of present
# triggers (the toy world's prior) and how many it names, the other absent classes and how many it names
COUNTS = ("mentions", "hallucinated_mentions", "hallucinated", "names_object", "recalled", "present",
          "partner_chances", "partners_named", "other_chances", "others_named", "responses")


def hallucination_counts(classes, truth, lures=(), objects=()):
    """One response's COUNTS from the classes it mentions (a list: repeats count as mentions), the classes
    present, the lures (absent classes the prior pulls towards) and the world's classes (for the other
    absent ones; empty: none counted)."""
    said, truth, lures = set(classes), set(truth), set(lures) - set(truth)
    others = set(objects) - truth - lures
    return dict(zip(COUNTS, (len(classes), sum(c not in truth for c in classes), int(bool(said - truth)),
                             int(bool(said)), len(said & truth), len(truth), len(lures), len(said & lures),
                             len(others), len(said & others), 1)))


def sum_counts(rows):
    return {k: sum(r[k] for r in rows) for k in COUNTS}


def hallucination_rates(counts, scale=100):
    """Rates from summed COUNTS (scale 100: percent, as Object HalBench reports them; 1: fractions): chair_s
    (responses with a hallucinated object over all), chair_s_refine (RLHF-V/RLAIF-V's Resp: over the
    responses that name an object), chair_i (Obj: hallucinated mentions over all mentions), recall, the
    partner and other-absent rates, objects per response. A rate over nothing is 0."""
    def rate(a, b):
        return scale * a / b if b else 0.0
    c = counts
    return {"chair_s": rate(c["hallucinated"], c["responses"]),
            "chair_s_refine": rate(c["hallucinated"], c["names_object"]),
            "chair_i": rate(c["hallucinated_mentions"], c["mentions"]), "recall": rate(c["recalled"], c["present"]),
            "partner_rate": rate(c["partners_named"], c["partner_chances"]),
            "other_absent_rate": rate(c["others_named"], c["other_chances"]),
            "objects_per_caption": c["mentions"] / c["responses"] if c["responses"] else 0.0}


def chair_scores(found, truths, answers):
    """Object HalBench's scores.json, in percent, from per response: its (phrase, class) mentions, its
    ground-truth classes and its text."""
    counts = sum_counts([hallucination_counts([c for _, c in f], t) for f, t in zip(found, truths)])
    rates = hallucination_rates(counts)
    return {**{k: rates[k] for k in ("chair_s", "chair_s_refine", "chair_i", "recall")},
            "avg_len": sum(len(a.split()) for a in answers) / len(answers),
            "n": len(found), "n_with_objects": counts["names_object"]}


# ----------------------------------------------------------------------------- POPE


def pope_says_no(text):
    """LLaVA's eval_pope.py rule: the text before the first ".", commas deleted, split on single spaces,
    holds the word No, no or not (so "No\\nthere" is one word, and reads as yes)."""
    return bool({"No", "no", "not"} & set(text.split(".")[0].replace(",", "").split(" ")))


def pope_scores(tp, fp, tn, fn):
    """Percent scores with "yes" as the positive class (n a count)."""
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": 100 * (tp + tn) / n, "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * (2 * precision * recall / (precision + recall) if tp else 0.0),
            "yes_ratio": 100 * (tp + fp) / n, "n": n}


def pope_metrics(labels, answers):
    """pope_scores of answers (read by pope_says_no) against labels "yes"/"no"."""
    pred = [not pope_says_no(a) for a in answers]
    gold = [label == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    return pope_scores(tp, fp, len(gold) - tp - fp - fn, fn)


# ----------------------------------------------------------------------------- MM-Vet

CAPABILITIES = ["rec", "ocr", "know", "gen", "spat", "math"]  # the columns of the paper's Table 2


def norm_words(text):
    """Lower-case words and numbers, without punctuation and articles."""
    return [w for w in re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()) if w not in ("a", "an", "the")]


def exact_score(ground_truth, answer):
    """The offline judge: the best <OR> alternative's share of <AND> parts whose words appear, in order
    and contiguous, in the answer."""
    ans = norm_words(answer)
    has = lambda part: any(ans[i:i + len(part)] == part for i in range(len(ans) - len(part) + 1))
    best = 0.0
    for alternative in ground_truth.split("<OR>"):
        parts = [norm_words(x) for x in alternative.split("<AND>")]
        parts = [x for x in parts if x]
        if parts:
            best = max(best, sum(map(has, parts)) / len(parts))
    return best


MMVET_RETRY = "\nPredict the correctness of the answer (digit): "  # what the official grader adds to a re-ask


def mmvet_query(prompt, question, ground_truth, prediction):
    """The official grader's query (MM-Vet's mm-vet_evaluator.py): the prompt, a newline, then `question |
    ground truth | prediction | `, the ground truth's <AND> and <OR> padded with spaces, the prediction as
    it is."""
    padded = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return prompt + "\n" + " | ".join([question, padded, prediction, ""])


def parse_grade(text):
    """A grade as the official grader reads a reply: the text before its first space, a number in [0, 1];
    None otherwise."""
    try:
        score = float(text.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def mmvet_grade(ask, query, retries=5):
    """The official grader's retry rule: ask(content, temperature) -> reply text, first at temperature 0;
    an unreadable reply is asked again with MMVET_RETRY appended, the first retry still at 0 and each
    later one 0.5 hotter; after the `retries`-th retry the grade is 0.0, that last reply unread.
    Returns (grade, the replies, whether it failed)."""
    replies, temperature = [ask(query, 0.0)], 0.0
    for _ in range(retries):
        score = parse_grade(replies[-1])
        if score is not None:
            return score, replies, False
        replies.append(ask(query + MMVET_RETRY, temperature))
        temperature += 0.5
    return 0.0, replies, True


def capability_scores(capabilities, grades):
    """{capability: mean grade x100 over the questions having it} for the capabilities present, and total;
    capabilities and grades keyed by question id. A question counts toward every capability it has."""
    out = {}
    for cap in CAPABILITIES:
        g = [grades[qid] for qid, caps in capabilities.items() if cap in caps]
        if g:
            out[cap] = 100 * sum(g) / len(g)
    out["total"] = 100 * sum(grades[qid] for qid in capabilities) / len(capabilities)
    return out


# ----------------------------------------------------------------------------- LLaVA-Bench in-the-Wild

LLAVA_CATEGORIES = ["conv", "detail", "complex"]


def score_pair(reply):
    """The two scores on the judge reply's first line (commas read as spaces, as LLaVA does), or None
    unless there are exactly two numbers in [0, 10] there."""
    parts = reply.split("\n")[0].replace(",", " ").split()
    try:
        scores = [float(x) for x in parts]
    except ValueError:
        return None
    return scores if len(scores) == 2 and all(math.isfinite(s) and 0 <= s <= 10 for s in scores) else None


def content_words(text):
    return set(re.findall(r"[a-z0-9]+", text.lower())) - {"a", "an", "the", "is", "are", "there", "it", "they", "at",
                                                          "of", "in", "on", "and", "to", "this", "that", "with"}


def overlap_score(answer, reference, context):
    """The offline judge (a smoke test, not GPT-4): 1 + 9 x F1 of the answer's content words, where
    precision counts the words found in the reference or the context and recall the reference's words
    the answer has. The reference itself scores 10; an answer without content words 1."""
    a, r = content_words(answer), content_words(reference)
    if not a:
        return 1.0
    precision = len(a & (r | content_words(context))) / len(a)
    recall = len(a & r) / len(r) if r else 1.0
    return 1 + 9 * (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def llava_parse_score(reply):
    """LLaVA's eval_gpt_review_bench.py reading of a judge reply: the first line, commas turned into spaces,
    split on single spaces, must be exactly two numbers; anything else is [-1, -1] ("8, 7" too: three parts)."""
    parts = reply.split("\n")[0].replace(",", " ").split(" ")
    try:
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1, -1]
    except ValueError:
        return [-1, -1]


def llava_summary(tuples, category_of):
    """What LLaVA's summarize_gpt_review.py prints for one run, from each question's [reference, model] tuple
    ([-1, -1] where LLaVA could not read the review, averaged in as LLaVA does): per category present and
    "all", the mean tuple with each mean rounded to 3 decimals, then the relative score rounded to 0.1."""
    out = {}
    for c in [c for c in LLAVA_CATEGORIES if c in category_of.values()] + ["all"]:
        ts = [t for qid, t in tuples.items() if c in ("all", category_of[qid])]
        ref = round(statistics.fmean(t[0] for t in ts), 3) if ts else 0
        out[c] = round(round(statistics.fmean(t[1] for t in ts), 3) / ref * 100, 1) if ref else None
    return out


def relative_scores(reviews, category_of):
    """{category and "all": mean(model) / mean(reference) x 100, "abs": {...: [mean reference, mean
    model]}} over one run's reviews ({question id: {"scores": [reference, model], "failed"}}) that are not
    failed, for the categories of category_of ({question id: category}) present; None where there are none
    (or the reference's mean is 0)."""
    out, absolute = {}, {}
    for c in [c for c in LLAVA_CATEGORIES if c in category_of.values()] + ["all"]:
        pairs = [r["scores"] for qid, r in reviews.items() if not r["failed"] and c in ("all", category_of[qid])]
        if not pairs:
            out[c] = absolute[c] = None
            continue
        ref, model = statistics.fmean(s[0] for s in pairs), statistics.fmean(s[1] for s in pairs)
        out[c], absolute[c] = 100 * model / ref if ref else None, [ref, model]
    return {**out, "abs": absolute}


# ----------------------------------------------------------------------------- over runs


def mean_std(runs):
    """(mean, population standard deviation (as MM-Vet's grader reports it; 0.0 for one run)) over runs of
    the same shape: dicts and lists of numbers, elementwise; None wherever a run has None."""
    def over(values, f):
        if any(v is None for v in values):
            return None
        if isinstance(values[0], dict):
            return {k: over([v[k] for v in values], f) for k in values[0]}
        if isinstance(values[0], list):
            return [over(list(column), f) for column in zip(*values)]
        return f(values)
    return over(runs, statistics.fmean), over(runs, statistics.pstdev)
