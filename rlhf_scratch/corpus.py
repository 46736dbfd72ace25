"""A built-in, offline corpus of short English movie reviews.

The tiny language model that RLHF later steers is pretrained on text from here:
short reviews (1-4 sentences, roughly 12-60 words) drawn from a hand-written
grammar, so the project needs no download and every run sees the same data for
a seed.

What the grammar covers:

* four sentiments (:data:`SENTIMENTS`): ``positive``, ``negative``, ``neutral``
  and ``mixed`` (both polarities in one review);
* many review *aspects* (acting, plot, score, cinematography, pacing, ...),
  each in a category so that adjectives fit the thing they describe
  ("a gripping plot", "wooden acting", "a sluggish second half");
* adjectives graded by strength in each polarity, intensifiers ("very",
  "incredibly", "a bit", "slightly"), hedges, negation of both polarities
  ("not bad at all" reads positive, "not very good" reads negative);
* several sentence shapes: plain judgements, "I found ...", exclamations,
  whole-film verdicts, reactions, recommendations, conditionals ("If you like
  westerns, ..."), comparisons ("better than the first one"), ratings
  ("I would give it 8 out of 10.") and neutral plot/viewing descriptions.

Labels agree with the reward model: the tests check that VADER's compound
score is clearly positive for ``positive`` reviews, clearly negative for
``negative`` ones and near zero for ``neutral`` ones.  Most positive reviews
are mildly or moderately positive, so RL has room to push them further.

The module also holds the "is this English?" metric used to judge samples from
the pretrained model (:func:`words`, :func:`is_english_word`,
:func:`english_word_share`).  It checks words against the ``english_words``
dictionaries (web2 + gcide), with simple inflection handling, and is
deliberately independent of the grammar's own lexicon: a word is never
accepted merely because the grammar uses it.  Instead, a test checks that every
word the grammar can emit passes the dictionary check.
"""

from __future__ import annotations

import functools
import operator
import random
import re
from pathlib import Path

__all__ = [
    "SENTIMENTS",
    "MAX_REVIEWS",
    "generate_labeled_reviews",
    "generate_reviews",
    "write_corpus",
    "words",
    "is_english_word",
    "english_word_share",
    "grammar_vocabulary",
]

SENTIMENTS = ("positive", "negative", "neutral", "mixed")

# Sampling weights of the four labels; neutral and mixed are a little rarer.
_LABEL_WEIGHTS = (0.3, 0.3, 0.2, 0.2)

# Hard cap on one request.  The grammar can make far more distinct reviews than
# this, but a request above it is almost certainly a mistake (and would take
# minutes), so it is refused at once.
MAX_REVIEWS = 2_000_000


# ---------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------
# Film nouns: (singular, plural).  "Generic" ones fit any review; genres add
# variety and feed the conditionals ("If you like westerns, ...").
_FILM_GENERIC = (
    ("movie", "movies"), ("film", "films"), ("picture", "pictures"),
    ("feature", "features"),
)
_FILM_OTHER = (
    ("sequel", "sequels"), ("remake", "remakes"), ("adaptation", "adaptations"),
    ("production", "productions"),
)
_GENRES = (
    ("comedy", "comedies"), ("drama", "dramas"), ("thriller", "thrillers"),
    ("documentary", "documentaries"), ("musical", "musicals"), ("western", "westerns"),
    ("horror film", "horror films"), ("romance", "romances"), ("mystery", "mysteries"),
    ("romantic comedy", "romantic comedies"), ("war film", "war films"),
    ("crime drama", "crime dramas"), ("spy thriller", "spy thrillers"),
    ("science fiction film", "science fiction films"), ("fantasy epic", "fantasy epics"),
    ("period drama", "period dramas"), ("family film", "family films"),
    ("animated film", "animated films"), ("adventure film", "adventure films"),
    ("detective story", "detective stories"), ("courtroom drama", "courtroom dramas"),
    ("superhero movie", "superhero movies"), ("disaster movie", "disaster movies"),
    ("monster movie", "monster movies"), ("ghost story", "ghost stories"),
    ("love story", "love stories"), ("satire", "satires"), ("sports drama", "sports dramas"),
    ("historical epic", "historical epics"), ("psychological thriller", "psychological thrillers"),
    ("action movie", "action movies"), ("martial arts film", "martial arts films"),
    ("road movie", "road movies"), ("space adventure", "space adventures"),
    ("teen comedy", "teen comedies"), ("political thriller", "political thrillers"),
    ("costume drama", "costume dramas"), ("nature documentary", "nature documentaries"),
    ("black comedy", "black comedies"), ("silent film", "silent films"),
    ("coming of age story", "coming of age stories"), ("gangster film", "gangster films"),
    ("chamber piece", "chamber pieces"), ("fairy tale", "fairy tales"),
)

# Review aspects: (noun phrase, plural?).  Grouped by category so adjectives fit.
_ASPECTS = {
    "perf": (
        ("acting", False), ("cast", False), ("performances", True), ("lead actor", False),
        ("lead actress", False), ("supporting cast", False), ("villain", False),
        ("hero", False), ("heroine", False), ("voice acting", False), ("child actors", True),
        ("ensemble", False), ("chemistry between the leads", False), ("leads", True),
        ("main actor", False), ("young star", False), ("casting", False),
    ),
    "story": (
        ("plot", False), ("story", False), ("script", False), ("screenplay", False),
        ("dialogue", False), ("writing", False), ("premise", False), ("ending", False),
        ("opening", False), ("first act", False), ("final act", False), ("climax", False),
        ("characters", True), ("plot twists", True), ("twist", False), ("central mystery", False),
        ("romance", False), ("subplot", False), ("final scene", False), ("narration", False),
        ("story arc", False), ("characterization", False), ("message", False), ("finale", False),
    ),
    "look": (
        ("cinematography", False), ("camera work", False), ("visuals", True),
        ("special effects", True), ("effects", True), ("costumes", True), ("set design", False),
        ("sets", True), ("production design", False), ("lighting", False), ("makeup", False),
        ("scenery", False), ("animation", False), ("fight scenes", True), ("action scenes", True),
        ("chase scenes", True), ("battle scenes", True), ("photography", False),
        ("colour palette", False), ("landscapes", True), ("creature design", False),
    ),
    "sound": (
        ("music", False), ("score", False), ("songs", True), ("sound design", False),
        ("theme song", False), ("dance numbers", True), ("choreography", False),
        ("orchestral score", False), ("sound mix", False),
    ),
    "pace": (
        ("pacing", False), ("editing", False), ("running time", False), ("second half", False),
        ("middle section", False), ("rhythm", False), ("first hour", False),
    ),
    "humour": (
        ("humour", False), ("jokes", True), ("comedy", False), ("gags", True), ("banter", False),
        ("comic timing", False), ("slapstick", False),
    ),
    "direction": (
        ("direction", False), ("tone", False), ("atmosphere", False), ("mood", False),
        ("world building", False), ("storytelling", False), ("style", False),
    ),
}

# Singular aspects that take no article ("a film with wooden acting").
_UNCOUNTABLE = frozenset({
    "acting", "voice acting", "casting", "dialogue", "writing", "narration", "characterization",
    "cinematography", "camera work", "set design", "production design", "lighting", "makeup",
    "scenery", "animation", "photography", "creature design", "music", "sound design",
    "choreography", "pacing", "editing", "rhythm", "humour", "comedy", "banter", "comic timing",
    "slapstick", "direction", "atmosphere", "world building", "storytelling", "style",
    "chemistry between the leads",
})

# Adjectives: (word, grade) with grade 3 = strong/absolute, 2 = clear, 1 = mild.
_GEN_POS = (
    ("superb", 3), ("brilliant", 3), ("outstanding", 3), ("magnificent", 3), ("excellent", 3),
    ("fantastic", 3), ("terrific", 3), ("wonderful", 3), ("marvelous", 3), ("splendid", 3),
    ("fabulous", 3), ("flawless", 3), ("masterful", 3), ("exceptional", 3), ("superlative", 3),
    ("first rate", 3), ("top notch", 3), ("perfect", 3), ("great", 3),
    ("strong", 2), ("impressive", 2), ("remarkable", 2), ("admirable", 2),
    ("effective", 2), ("lovely", 2), ("delightful", 2), ("memorable", 2), ("accomplished", 2),
    ("confident", 2), ("inspired", 2), ("pleasing", 2), ("satisfying", 2), ("skilful", 2),
    ("good", 1), ("solid", 1), ("decent", 1), ("fine", 1), ("nice", 1), ("pleasant", 1),
    ("competent", 1), ("agreeable", 1), ("respectable", 1), ("enjoyable", 1), ("likeable", 1),
)
_GEN_NEG = (
    ("terrible", 3), ("awful", 3), ("dreadful", 3), ("horrible", 3), ("abysmal", 3),
    ("atrocious", 3), ("dismal", 3), ("pathetic", 3), ("lousy", 3), ("horrendous", 3),
    ("appalling", 3), ("woeful", 3), ("disastrous", 3), ("embarrassing", 3), ("dire", 3),
    ("bad", 2), ("poor", 2), ("weak", 2), ("feeble", 2), ("sloppy", 2), ("clumsy", 2),
    ("lazy", 2), ("amateurish", 2), ("shoddy", 2), ("disappointing", 2), ("uninspired", 2),
    ("lackluster", 2), ("lame", 2), ("frustrating", 2), ("irritating", 2), ("annoying", 2),
    ("mediocre", 1), ("forgettable", 1), ("flat", 1), ("bland", 1), ("dull", 1), ("messy", 1),
    ("tired", 1), ("unconvincing", 1), ("underwhelming", 1),
)
_CAT_POS = {
    "perf": (
        ("convincing", 2), ("natural", 1), ("charismatic", 2), ("believable", 1), ("moving", 2),
        ("nuanced", 2), ("magnetic", 2), ("heartfelt", 2), ("sincere", 2), ("charming", 2),
        ("talented", 2), ("committed", 2), ("warm", 1), ("funny", 2), ("touching", 2),
        ("powerful", 2), ("lively", 1), ("radiant", 2), ("sympathetic", 1),
    ),
    "story": (
        ("gripping", 2), ("compelling", 2), ("clever", 2), ("original", 2), ("smart", 2),
        ("intelligent", 2), ("thoughtful", 2), ("witty", 2), ("engaging", 2), ("fascinating", 2),
        ("interesting", 1), ("inventive", 2), ("imaginative", 2), ("fresh", 1), ("surprising", 1),
        ("moving", 2), ("touching", 2), ("poignant", 2), ("heartwarming", 2), ("exciting", 2),
        ("thrilling", 2), ("suspenseful", 2), ("intriguing", 2), ("sharp", 2), ("funny", 2),
        ("beautiful", 3), ("hopeful", 1), ("uplifting", 2), ("wise", 2), ("honest", 2),
    ),
    "look": (
        ("gorgeous", 3), ("beautiful", 3), ("stunning", 3), ("dazzling", 3), ("spectacular", 3),
        ("lush", 2), ("vivid", 2), ("vibrant", 2), ("colourful", 1), ("elegant", 2),
        ("stylish", 2), ("handsome", 2), ("crisp", 1), ("striking", 2), ("inventive", 2),
        ("glorious", 3), ("imaginative", 2), ("exciting", 2), ("thrilling", 2), ("clean", 1),
        ("detailed", 1), ("sumptuous", 3), ("eye catching", 2),
    ),
    "sound": (
        ("beautiful", 3), ("lovely", 2), ("memorable", 2), ("catchy", 2), ("rousing", 2),
        ("stirring", 2), ("lively", 1), ("joyful", 2), ("uplifting", 2), ("gorgeous", 3),
        ("elegant", 2), ("playful", 1), ("vibrant", 2), ("moving", 2), ("lush", 2),
        ("glorious", 3), ("sweet", 1), ("exciting", 2), ("infectious", 2),
    ),
    "pace": (
        ("brisk", 2), ("tight", 2), ("lively", 1), ("confident", 2), ("assured", 2),
        ("smooth", 1), ("crisp", 1), ("energetic", 2), ("efficient", 1), ("snappy", 2),
        ("graceful", 2), ("exciting", 2), ("well judged", 2),
    ),
    "humour": (
        ("funny", 2), ("hilarious", 3), ("witty", 2), ("clever", 2), ("sharp", 2),
        ("playful", 1), ("charming", 2), ("delightful", 2), ("sweet", 1), ("warm", 1),
        ("fresh", 1), ("inventive", 2), ("clever and kind", 2), ("good natured", 1),
    ),
    "direction": (
        ("assured", 2), ("confident", 2), ("elegant", 2), ("stylish", 2), ("inventive", 2),
        ("bold", 2), ("ambitious", 2), ("graceful", 2), ("controlled", 1), ("vivid", 2),
        ("warm", 1), ("thoughtful", 2), ("intelligent", 2), ("playful", 1), ("gripping", 2),
        ("haunting", 2), ("magical", 3),
    ),
}
_CAT_NEG = {
    "perf": (
        ("wooden", 2), ("stiff", 2), ("flat", 1), ("unconvincing", 2), ("lifeless", 2),
        ("awkward", 1), ("forced", 2), ("hammy", 2), ("overwrought", 2), ("bland", 1),
        ("annoying", 2), ("irritating", 2), ("dull", 1), ("miscast", 3), ("painful", 3),
        ("smug", 1), ("grating", 2), ("charmless", 2), ("cold", 1),
    ),
    "story": (
        ("predictable", 1), ("confusing", 2), ("incoherent", 2), ("cliched", 2), ("dull", 1),
        ("boring", 2), ("tedious", 2), ("silly", 1), ("stupid", 2), ("ridiculous", 2),
        ("implausible", 2), ("contrived", 2), ("shallow", 2), ("thin", 1), ("flimsy", 2),
        ("muddled", 2), ("pointless", 2), ("derivative", 2), ("formulaic", 1),
        ("hackneyed", 2), ("trite", 2), ("banal", 2), ("dumb", 2), ("idiotic", 3), ("stale", 2),
        ("preachy", 2), ("sappy", 1), ("generic", 1), ("insipid", 2), ("joyless", 2),
        ("miserable", 2), ("grim", 2), ("laughable", 2), ("empty", 2),
    ),
    "look": (
        ("ugly", 2), ("murky", 2), ("cheap", 2), ("tacky", 2), ("dated", 1), ("garish", 2),
        ("drab", 1), ("cheesy", 1), ("unconvincing", 2), ("messy", 1), ("chaotic", 2),
        ("dull", 1), ("bland", 1), ("ugly and cheap", 3), ("incoherent", 2), ("lifeless", 2),
        ("dreary", 2), ("muddy", 2),
    ),
    "sound": (
        ("annoying", 2), ("intrusive", 2), ("grating", 2), ("loud", 1), ("noisy", 1),
        ("forgettable", 1), ("generic", 1), ("bland", 1), ("repetitive", 2), ("overbearing", 2),
        ("irritating", 2), ("sappy", 1), ("saccharine", 2), ("cheesy", 1), ("dull", 1),
        ("shrill", 2), ("tuneless", 2), ("monotonous", 2),
    ),
    "pace": (
        ("slow", 1), ("sluggish", 2), ("plodding", 2), ("tedious", 2), ("tiring", 2),
        ("tiresome", 2), ("choppy", 2), ("rushed", 1), ("uneven", 1), ("overlong", 2),
        ("bloated", 2), ("meandering", 2), ("aimless", 2), ("dull", 1), ("boring", 2),
        ("monotonous", 2), ("repetitive", 2), ("exhausting", 2), ("painful", 3), ("dreary", 2),
    ),
    "humour": (
        ("unfunny", 2), ("lame", 2), ("crude", 2), ("juvenile", 2), ("silly", 1), ("stale", 2),
        ("forced", 2), ("childish", 2), ("cheap", 2), ("annoying", 2), ("stupid", 2),
        ("dumb", 2), ("embarrassing", 3), ("flat", 1), ("tired", 1), ("tasteless", 2),
        ("mean spirited", 2), ("painful", 3),
    ),
    "direction": (
        ("clumsy", 2), ("heavy handed", 2), ("muddled", 2), ("confused", 2), ("flat", 1),
        ("lifeless", 2), ("uneven", 1), ("dreary", 2), ("pretentious", 2), ("lazy", 2),
        ("chaotic", 2), ("messy", 1), ("joyless", 2), ("gloomy", 2), ("inept", 3), ("cold", 1),
    ),
}
# Adjectives that sit on neither side (VADER scores them zero).
_NEU_ADJ = (
    "average", "ordinary", "standard", "typical", "conventional", "familiar", "simple",
    "straightforward", "modest", "middling", "unremarkable", "passable", "serviceable",
    "traditional", "functional", "workmanlike", "uneven", "old fashioned", "low key",
    "predictable", "routine", "unsurprising", "restrained", "understated", "quiet",
    "measured", "plain", "unfussy", "minimal", "classical",
)
# Words for "the X is far too Y", for complaints and hedges, by aspect category.
_TOO_ADJ = {
    "perf": ("broad", "mannered", "theatrical", "restrained", "quiet", "low key"),
    "story": ("predictable", "obvious", "tidy", "simple", "talky", "familiar", "convenient", "long"),
    "look": ("dark", "busy", "glossy", "murky", "cluttered"),
    "sound": ("loud", "busy", "insistent", "syrupy"),
    "pace": ("slow", "long", "rushed", "leisurely", "hurried"),
    "humour": ("broad", "obvious", "predictable", "crude", "silly"),
    "direction": ("slow", "dark", "busy", "cold", "restrained", "glossy"),
}
# Negatives that VADER knows, to be negated into praise ("never dull").
_DULL_WORDS = (
    "dull", "boring", "bad", "weak", "poor", "tedious", "disappointing", "tiresome", "tired",
)
# Positives that VADER knows, to be negated into complaints ("not very good").
_GOOD_WORDS = (
    "good", "great", "interesting", "exciting", "impressive", "engaging", "convincing",
    "enjoyable", "satisfying", "memorable", "strong", "effective", "special",
)

# Intensifiers by polarity and grade.
# ("so ", "just " and "quite " are dropped after an article: "a so clever film".)
_POS_INT = {
    3: ("", "", "", "absolutely ", "truly ", "simply ", "just "),
    2: ("", "", "very ", "really ", "incredibly ", "extremely ", "genuinely ", "remarkably ",
        "quite ", "so ", "consistently ", "surprisingly "),
    1: ("", "", "quite ", "pretty ", "fairly ", "reasonably ", "rather ", "perfectly ",
        "very ", "really "),
}
_NEG_INT = {
    3: ("", "", "", "absolutely ", "simply ", "utterly ", "just "),
    2: ("", "", "very ", "really ", "incredibly ", "extremely ", "painfully ", "quite ", "so ",
        "horribly ", "rather ", "terribly "),
    1: ("", "", "a bit ", "a little ", "slightly ", "somewhat ", "rather ", "fairly ",
        "very ", "really "),
}
# "perfectly" only goes with a few mild words ("perfectly decent").
_PERFECTLY_OK = frozenset({
    "good", "decent", "fine", "nice", "pleasant", "competent", "respectable", "enjoyable",
    "likeable", "agreeable", "solid", "natural", "believable", "smooth", "efficient",
})
# Mild intensifiers for hedges ("a bit slow in places").
_MILD_INT = ("", "a bit ", "a little ", "slightly ", "somewhat ")
# Grade sampling weights (strong, clear, mild): leave most reviews short of
# maximally positive so RL has something to improve.
_GRADE_WEIGHTS = {3: 0.25, 2: 0.45, 1: 0.30}

# Nouns for whole-film praise and complaints.
_POS_NOUNS = (
    "treat", "delight", "joy", "pleasure", "triumph", "gem", "masterpiece", "crowd pleaser",
    "winner", "marvel",
)
_NEG_NOUNS = (
    "mess", "disaster", "letdown", "chore", "bore", "failure", "slog", "misfire", "flop",
    "disappointment", "waste of time",
)

# People, times and places for neutral descriptions and viewing context.
_COMPANIONS = (
    "my wife", "my husband", "my kids", "my partner", "my brother", "my sister",
    "my parents", "a friend", "my girlfriend", "my dad", "my mother", "my roommate",
    "my grandmother", "the whole family", "my daughter", "my son", "some colleagues",
    "my neighbours", "my uncle", "my cousins", "my flatmate", "my father", "my grandfather",
    "my aunt", "my nephew", "my niece", "my classmates", "my book club",
)
_WHEN = (
    "last night", "on Friday night", "over the weekend", "on a rainy Sunday", "on a long flight",
    "last week", "yesterday", "this afternoon", "on opening night", "at a late show",
    "at a preview screening", "on a quiet evening", "over the winter break", "on a Saturday morning",
    "at a matinee", "on a train journey", "after work", "on a snowy evening", "on a whim",
    "at a small local cinema", "on television", "at home",
)
_PROTAGONISTS = (  # (who, plural?)
    ("a young teacher", False), ("a retired detective", False), ("a jazz musician", False),
    ("an old farmer", False), ("a small town sheriff", False), ("a single mother", False),
    ("a young lawyer", False), ("a young soldier", False), ("an aging boxer", False),
    ("a teenage girl", False), ("a famous chef", False), ("a ship captain", False),
    ("a country doctor", False), ("a journalist", False), ("two brothers", True),
    ("a group of students", True), ("a family of farmers", True), ("a young couple", True),
    ("an astronaut", False), ("a middle aged father", False), ("a travelling salesman", False),
    ("an old fisherman", False), ("a ballet dancer", False), ("a young bride", False),
    ("a veteran pilot", False), ("a young scientist", False), ("a former actor", False),
    ("a police officer", False), ("a crew of bank robbers", True), ("an orphan girl", False),
    ("a grandmother", False), ("a retired spy", False), ("a chess player", False),
    ("a school principal", False), ("a pair of sisters", True), ("a wildlife photographer", False),
    ("a painter", False), ("a young prince", False), ("a taxi driver", False),
    ("a night nurse", False), ("a lighthouse keeper", False), ("a college professor", False),
)
_PLOT_ACTIONS = (
    "returns home after many years", "tries to keep the family farm", "searches for a sister",
    "travels across the country", "plans one last job", "falls for a stranger",
    "investigates a series of odd events", "enters a national competition",
    "breaks out of a mountain camp", "tries to keep a small restaurant open",
    "joins a travelling circus", "looks after an elderly neighbour", "goes looking for gold",
    "trains for one last match", "moves to a new city", "takes over a small newspaper",
    "starts a band", "sails around the world", "opens a bakery", "runs for mayor",
    "discovers an old family secret", "tracks down a gang of forgers", "builds a boat",
    "crosses the desert on foot", "teaches at a village school", "inherits an old hotel",
    "writes a memoir", "tries to reunite an old band", "buys a run down cinema",
    "changes careers at fifty", "takes a road trip with a grandson",
)
_SETTINGS = (
    "in a small coastal town", "in a quiet mountain village", "on a remote island",
    "in a busy city", "in wartime", "in the near future", "in the desert",
    "on a space station", "in a fishing village", "in the fifties", "in the suburbs",
    "at a boarding school", "on a farm", "at sea", "in a snowy northern town",
    "in medieval times", "in a seaside resort",
    "in the countryside", "in the jungle", "in a hospital", "on a long train journey",
    "in a tall apartment building", "during the winter",
    "in the nineteenth century", "in a small border town", "in the Arctic",
)
_SOURCES = (
    "novel", "true story", "comic book", "stage show", "short story", "children's book",
    "famous poem", "stage musical", "old radio drama", "memoir", "newspaper article",
    "video game", "long poem", "magazine article",
)
_LENGTHS = (
    "about two hours", "just under two hours", "a little over two hours", "ninety minutes",
    "nearly three hours", "about an hour and a half", "almost two and a half hours",
)
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
_LIKE_VERBS = ("like", "love", "enjoy", "are into", "have a soft spot for", "are a fan of")
# Valence free versions, for warnings in negative reviews.
_INTO_VERBS = ("are into", "grew up on", "watch a lot of", "usually go for")
_LIKES_VERBS = ("likes", "loves", "enjoys", "is into", "has a soft spot for", "is a fan of")
_ORDINALS = ("first", "second", "third", "fourth", "latest", "newest")

# ---------------------------------------------------------------------------
# Sentence templates.  Slots in braces; see ``_Review._fill`` for their meaning.
#   {asp}/{asp2}: aspects; {be}/{be2}: their verb (tense and number agree;
#   {bep} is always past); {stands}/{lets}: verbs agreeing with {asp};
#   {pos}/{neg}: graded, maybe intensified adjective phrases fitting {asp};
#   {pos2}/{neg2}: the same for {asp2}; {pos_b}/{neg_b}: a second, bare
#   adjective for {asp}; {a_pos}/{a_neg}(_strong): article plus a generic
#   adjective phrase; {film}/{films}: film noun; {is}: "is" or "was";
#   {dull}/{good}: words to negate; {hi}/{lo}/{mid}/{mix}: a rating as a word
#   ({..._d}: as digits); {who}/{does}/{where}/{when}/...: description parts.
#   Templates are written so every word in them passes ``is_english_word``.
# ---------------------------------------------------------------------------
_T_POS_ASPECT = (
    "The {asp} {be} {pos}.",
    "The {asp} {be} {pos}.",
    "The {asp} {be} {pos} and {pos_b}.",
    "I found the {asp} {pos}.",
    "I found the {asp} {pos} and {pos_b}.",
    "I thought the {asp} {bep} {pos}.",
    "The {asp} {be} {pos}, and the {asp2} {be2} even better.",
    "The {asp} {be} {pos}, and the {asp2} {be2} {pos2} too.",
    "{Pos_bare} {asp}, {pos2_bare} {asp2}.",
    "The {asp} in particular {be} {pos}.",
    "Special mention goes to the {asp}, which {be} {pos}.",
    "The {asp} really {stands} out.",
    "I loved the {asp}.",
    "I really enjoyed the {asp}.",
    "I was impressed by the {asp}.",
    "The {asp} alone {be} worth the price of admission.",
    "The {asp} {be} {pos} from start to finish.",
    "Both the {asp} and the {asp2} are {pos_shared}.",
    "The {asp} {be} {pos}, and it shows.",
    "On top of that, the {asp} {be} {pos}.",
    "Even the {asp} {be} {pos}.",
)
_T_NEG_ASPECT = (
    "The {asp} {be} {neg}.",
    "The {asp} {be} {neg}.",
    "The {asp} {be} {neg} and {neg_b}.",
    "I found the {asp} {neg}.",
    "I found the {asp} {neg} and {neg_b}.",
    "I thought the {asp} {bep} {neg}.",
    "The {asp} {be} {neg}, and the {asp2} {be2} even worse.",
    "The {asp} {be} {neg}, and the {asp2} {be2} {neg2} too.",
    "{Neg_bare} {asp}, {neg2_bare} {asp2}.",
    "The {asp} in particular {be} {neg}.",
    "The {asp} {lets} the whole thing down.",
    "I hated the {asp}.",
    "I could not stand the {asp}.",
    "The {asp} {be} the weakest part.",
    "The {asp} {be} {neg} from start to finish.",
    "Both the {asp} and the {asp2} are {neg_shared}.",
    "On top of that, the {asp} {be} {neg}.",
    "Even the {asp} {be} {neg}.",
    "The {asp} {be} far too {too}.",
    "To make matters worse, the {asp} {be} {neg}.",
)
_T_POS_FILM = (
    "It {is} {a_pos} {film}.",
    "This is {a_pos} {film} from start to finish.",
    "What {a_pos_strong} {film}!",
    "What {a_pos_strong} {film} this is!",
    "It {is} a real {pos_noun}.",
    "It {is} an absolute {pos_noun}.",
    "It {is} a {pos_noun} from beginning to end.",
    "The director clearly knows how to build tension.",
    "The director clearly knows what she is doing.",
    "The director clearly knows what he is doing.",
    "The director has a wonderful eye for detail.",
    "The whole cast is on great form.",
    "The cast clearly had fun making it.",
    "It kept me hooked from start to finish.",
    "It kept me on the edge of my seat.",
    "I laughed out loud more than once.",
    "I was smiling all the way home.",
    "The ending really moved me.",
    "I was completely absorbed from the first scene.",
    "Every scene feels carefully crafted.",
    "Every frame is a pleasure to look at.",
    "It is the kind of {film} they rarely make any more.",
    "It is funny, clever and surprisingly moving.",
    "It is smart, warm and beautifully made.",
    "It is a lovely surprise.",
    "It is great fun from start to finish.",
    "There is so much to love here.",
    "Everything about it just works.",
    "It is a joy to watch.",
    "Wow, what a ride!",
    "I enjoyed every minute of it.",
    "I loved it.",
    "I really liked it.",
    "It is a wonderful way to spend an evening.",
    "It all comes together beautifully.",
    "It has real heart.",
)
_T_NEG_FILM = (
    "It {is} {a_neg} {film}.",
    "This is {a_neg} {film} from start to finish.",
    "What {a_neg_strong} {film}!",
    "What a waste of two hours!",
    "What a waste of a good cast!",
    "What a waste of time!",
    "It {is} a complete {neg_noun}.",
    "It {is} a {neg_noun} from beginning to end.",
    "It {is} a total {neg_noun}.",
    "The ending falls flat.",
    "The jokes never land.",
    "The story goes nowhere.",
    "The plot makes no sense.",
    "The director seems to have no idea what to do with the material.",
    "I nearly fell asleep halfway through.",
    "I checked my watch more than once.",
    "I wanted my money back.",
    "I walked out after an hour.",
    "It felt twice as long as it was.",
    "Nothing about it works.",
    "It is a mess from start to finish.",
    "Every scene drags.",
    "The whole thing feels lazy and cheap.",
    "The whole thing feels rushed and careless.",
    "I was bored within twenty minutes.",
    "I was bored stiff.",
    "It is dull, lazy and badly made.",
    "It is ugly, loud and boring.",
    "Sadly, it is a huge disappointment.",
    "It is a chore to sit through.",
    "I could not care less about anyone on screen.",
    "I hated it.",
    "I really disliked it.",
    "It is painful to watch.",
    "The cast looks as bored as I was.",
)
_T_POS_NEGATION = (
    "Not bad at all, honestly.",
    "Not bad at all.",
    "It {is} not a bad {film} at all.",
    "The {asp} {be} never {dull}.",
    "The {asp} {be} not {dull} at all.",
    "There is not a single dull moment.",
    "There is never a dull moment.",
    "I was never bored.",
    "It is never boring.",
    "It is not bad, not bad at all.",
    "The {asp} {be} never {dull} or {dull2}.",
    "Not a bad way to spend two hours.",
    "It never feels {dull}.",
)
_T_NEG_NEGATION = (
    "The {asp} {be} not very {good}.",
    "The {asp} {be} not {good} at all.",
    "It {is} not a good {film}.",
    "It {is} not a very good {film}.",
    "Not very {good}, sadly.",
    "It is not {good}, and it is not {good2} either.",
    "The {asp} {be} never {good}.",
    "I did not enjoy it at all.",
    "I did not like the {asp} at all.",
    "It is not funny, not clever and not worth your time.",
    "It never feels {good}.",
    "Nothing about the {asp} is {good}.",
    "The {asp} {be} not {good} or {good2}.",
)
_T_POS_CLOSE = (
    "Highly recommended.",
    "I would happily recommend it.",
    "I would recommend it to anyone who {likes} {films}.",
    "Definitely worth watching.",
    "Well worth a look.",
    "Go and see it.",
    "Do not miss this one.",
    "I will be watching it again soon.",
    "I can't wait to see it again.",
    "Bring the whole family.",
    "You will not regret it.",
    "If you {like} {films}, you will love this one.",
    "If you {like} {films}, you will enjoy this one.",
    "If you {like} {films}, this one is a must.",
    "If you only see one {film} this year, make it this one.",
    "It is even better than the first one.",
    "Much better than the original.",
    "It is better than the book.",
    "It is better than I expected.",
    "Easily the best {film} I have seen this year.",
    "It is one of the best {films} in years.",
    "I would give it {hi} out of ten.",
    "I would give it {hi_d} out of 10.",
    "{Hi} out of ten from me.",
    "A solid {hi} out of ten.",
    "I give it a well deserved {hi} out of ten.",
    "Worth every penny.",
    "I will definitely watch it again.",
    "I will be recommending it to all my friends.",
)
_T_NEG_CLOSE = (
    "Skip this one.",
    "Keep your money in your pocket.",
    "Avoid at all costs.",
    "I would not recommend it to anyone.",
    "Not worth the ticket price.",
    "Stay away.",
    "I want those two hours back.",
    "Not recommended.",
    "If you {into} {films}, you will be disappointed.",
    "If you {into} {films}, you will hate this one.",
    "Even if you {into} {films}, give this one a miss.",
    "It is much worse than the first one.",
    "Far worse than the original.",
    "It is one of the worst {films} I have ever seen.",
    "Easily the worst {film} I have seen this year.",
    "It is worse than I expected.",
    "Even the trailer was boring.",
    "I would give it {lo} out of ten.",
    "I would give it {lo_d} out of 10.",
    "{Lo} out of ten, at most.",
    "{Lo} out of ten from me.",
    "A weak {lo} out of ten.",
    "I will not be watching it again.",
    "What a disappointment.",
)
_T_NEU = (
    "The {asp} {be} {neu}.",
    "The {asp} {be} fairly {neu}.",
    "I found the {asp} {neu}.",
    "The {asp} {be} {neu}, and so {be} the {asp2}.",
    "It {is} {a_neu} {film}.",
    "It {is} {a_neu} {film} with {a_neu_asp}.",
    "It is neither a triumph nor a disaster.",
    "It is neither great nor terrible.",
    "The {asp} {be} neither here nor there.",
    "Some scenes work, and some do not.",
    "It has good moments and weak moments.",
    "It is about what you would expect from this sort of {film}.",
    "It does what it sets out to do.",
    "It is the sort of {film} you watch once.",
    "I have mixed feelings about it.",
    "Fans of {films} will know what to expect.",
    "Your mileage may vary.",
    "It is an average {film}, nothing more, nothing less.",
    "I did not love it, and I did not hate it.",
    "It is fine for a quiet evening at home.",
    "I would give it {mid} out of ten.",
    "I would give it {mid_d} out of 10.",
    "Rating: {mid} out of ten.",
    "{Mid} out of ten.",
    "Make of that what you will.",
    "It is a quick watch.",
    "Whether it works for you will depend on your taste.",
    "It is {a_film} for a quiet afternoon.",
    "It is a middle of the road {film}.",
    "Nothing in it is especially good or especially bad.",
)
_T_DESCRIBE = (
    "It follows {who} who {does}.",
    "The story follows {who} who {does}.",
    "The story is set {where}.",
    "It is set {where} and follows {who}.",
    "The {film} runs {length}.",
    "It runs {length}.",
    "It is based on a {source}.",
    "It is based on a {source} of the same name.",
    "I watched it {when} with {company}.",
    "I saw it {when}.",
    "I watched this {film} {when}.",
    "I caught it {when} with {company}.",
    "It is the {ordinal} {film} from this director.",
    "It is the {ordinal} {film} in the series.",
    "The cast includes several familiar faces.",
    "Most of it was shot on location.",
    "It is mostly in black and white.",
    "Most of the story takes place over a single day.",
    "It is told in flashbacks.",
    "The {film} is mostly dialogue.",
    "It is the director's {ordinal} {film}.",
    "There are subtitles.",
    "It is {a_film} about {who} who {does}.",
    "My expectations were {expect}.",
    "I went in knowing nothing about it.",
    "I had read the {source} first.",
)
_T_MIXED = (
    "The {asp} {be} {pos}, but the {asp2} {be2} {neg2}.",
    "The {asp} {be} {neg}, but the {asp2} {be2} {pos2}.",
    "Although the {asp} {be} {pos}, the {asp2} {be2} {neg2}.",
    "Although the {asp} {be} {neg}, the {asp2} {be2} {pos2}.",
    "{Pos_bare} {asp}, shame about the {asp2}.",
    "I loved the {asp}, but I found the {asp2} {neg2}.",
    "I hated the {asp}, but I found the {asp2} {pos2}.",
    "The {asp} {be} {pos}; the {asp2}, less so.",
    "It has its moments, but it never quite comes together.",
    "It starts well but loses its way in the second half.",
    "It starts slowly but gets much better in the second half.",
    "It {is} {a_pos} {film} with {a_neg_asp}.",
    "The director clearly knows how to build tension, but the ending falls flat.",
    "The {asp} {be} {pos}, while the {asp2} {be2} {neg2}.",
    "For all its {pos_bare} {asp}, the {film} is let down by {a_neg_asp}.",
    "Great {asp}, weak {asp2}.",
    "The {asp} {be} {pos}, yet the {asp2} {be2} {neg2}.",
    "It is beautiful to look at but painfully slow.",
    "It is funny in places but far too long.",
    "The first half is great, the second half is a mess.",
)
_T_MIXED_CLOSE = (
    "I would give it {mix} out of ten.",
    "{Mix} out of ten.",
    "Worth a look, but keep your expectations in check.",
    "A mixed bag overall.",
    "Good in parts, bad in others.",
    "Flawed, but worth seeing.",
    "Not perfect, but not a disaster either.",
    "I liked it more than I disliked it.",
    "I have mixed feelings about it.",
    "Wait for it to come to television.",
    "It is a mixed bag.",
)
# Connectives prepended now and then to the last sentence, by label.
_OPENERS = {
    "positive": ("Honestly, ", "Overall, ", "All in all, ", "In the end, ", "In short, ",
                 "All told, ", "Frankly, "),
    "negative": ("Overall, ", "All in all, ", "In the end, ", "In short, ", "Frankly, ",
                 "Sadly, ", "Unfortunately, "),
    "neutral": ("Overall, ", "All in all, ", "In the end, ", "In short, ", "All told, "),
    "mixed": ("Overall, ", "All in all, ", "In the end, ", "In short, ", "All told, "),
}
# Turns between the two halves of a mixed review, by the polarity of the second.
_TURNS = {
    True: ("On the other hand, ", "That said, ", "Still, ", "Then again, ", "Thankfully, ",
           "On the plus side, "),
    False: ("However, ", "That said, ", "Sadly, ", "Then again, ", "Unfortunately, ",
            "On the other hand, "),
}


_EXPECTATIONS = ("low", "high", "sky high", "modest", "not very high", "middling")
# Words the generator adds outside the tables (verb forms, articles, glue).
_FIXED_WORDS = (
    "was were is are a an it but still stood stand stands let lets in places the",
    "a bit too", "it was", "it is", "but I still enjoyed it",
)


def _all_strings():
    """Every string the grammar can emit, for the vocabulary check."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)

    walk((
        _FILM_GENERIC, _FILM_OTHER, _GENRES, _ASPECTS, _GEN_POS, _GEN_NEG, _CAT_POS, _CAT_NEG,
        _NEU_ADJ, _TOO_ADJ, _DULL_WORDS, _GOOD_WORDS, _POS_INT, _NEG_INT, _MILD_INT,
        _POS_NOUNS, _NEG_NOUNS, _COMPANIONS, _WHEN, _PROTAGONISTS, _PLOT_ACTIONS,
        [_plural_verb_phrase(a) for a in _PLOT_ACTIONS], _SETTINGS, _SOURCES, _LENGTHS,
        _NUMBER_WORDS, _LIKE_VERBS, _INTO_VERBS, _LIKES_VERBS, _ORDINALS, _EXPECTATIONS,
        _T_POS_ASPECT, _T_NEG_ASPECT, _T_POS_FILM, _T_NEG_FILM, _T_POS_NEGATION,
        _T_NEG_NEGATION, _T_POS_CLOSE, _T_NEG_CLOSE, _T_NEU, _T_DESCRIBE, _T_MIXED,
        _T_MIXED_CLOSE, _OPENERS, _TURNS, _FIXED_WORDS,
    ))
    return out


_SLOT_RE = re.compile(r"\{[A-Za-z0-9_]+\}")


def grammar_vocabulary() -> frozenset[str]:
    """All lowercase words (as :func:`words` splits them) the grammar can emit."""
    vocab: set[str] = set()
    for s in _all_strings():
        vocab.update(words(_SLOT_RE.sub(" ", s)))
    return frozenset(vocab)


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------
_EXCEPTIONS_A = ("one", "once", "uni", "use", "usu", "eu", "ute")  # "a unique", "a one ..."
_EXCEPTIONS_AN = ("hour", "honest", "honour")


def _article(phrase: str) -> str:
    """``"apple"`` -> ``"an apple"``, ``"unique"`` -> ``"a unique"``."""
    low = phrase.lower()
    if low.startswith(_EXCEPTIONS_AN):
        return "an " + phrase
    if low[:1] in "aeiou" and not low.startswith(_EXCEPTIONS_A):
        return "an " + phrase
    return "a " + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _prefix(connective: str, sentence: str) -> str:
    """``"Still, " + "The plot is thin."`` -> ``"Still, the plot is thin."``"""
    if sentence.startswith(("I ", "I'")):
        return connective + sentence
    return connective + sentence[:1].lower() + sentence[1:]


def _plural_verb_phrase(phrase: str) -> str:
    """Third person singular to plural on the first verb: "tries to" -> "try to"."""
    verb, _, rest = phrase.partition(" ")
    if verb.endswith("ies"):
        verb = verb[:-3] + "y"
    elif verb.endswith(("sses", "ches", "shes", "xes", "oes")):
        verb = verb[:-2]
    elif verb.endswith("s"):
        verb = verb[:-1]
    return verb + (" " + rest if rest else "")


def _weighted_grade(rng: random.Random, entries):
    # Pick an entry, reweighting by grade so strong words are not the norm.
    while True:
        word, grade = entries[rng.randrange(len(entries))]
        if rng.random() < _GRADE_WEIGHTS[grade] / 0.45:
            return word, grade


_ASPECT_LIST = tuple((text, plural, cat) for cat, items in _ASPECTS.items() for text, plural in items)
# Category words count twice, so most adjectives fit their aspect closely.
_POS_BY_CAT = {cat: _GEN_POS + _CAT_POS[cat] + _CAT_POS[cat] for cat in _ASPECTS}
_NEG_BY_CAT = {cat: _GEN_NEG + _CAT_NEG[cat] + _CAT_NEG[cat] for cat in _ASPECTS}
_MILD_NEG_BY_CAT = {cat: tuple(w for w, g in _CAT_NEG[cat] + _GEN_NEG if g == 1) for cat in _ASPECTS}

# Templates that lean on an earlier judgement ("On top of that, ...", "... even
# better"); they never open a review's judgements and never join the two
# halves of a mixed review.
_ADDITIVE_MARKS = ("On top of that", "Even the", "To make matters worse", "even better",
                   "even worse", " too.", "Both the", "and it shows")


def _is_additive(t: str) -> bool:
    return any(m in t for m in _ADDITIVE_MARKS)


def _is_rating(t: str) -> bool:
    return "out of ten" in t or "out of 10" in t


# Description slots that may each be filled once per review (one viewing, one source, ...).
_TOPIC_SLOTS = frozenset({"when", "source", "length", "ordinal", "where", "who", "expect"})


def _topics(t: str) -> frozenset[str]:
    return frozenset(m.group(0)[1:-1] for m in _SLOT_RE.finditer(t)) & _TOPIC_SLOTS


def _has_connective(t: str) -> bool:
    """Whether a sentence already opens with a connective ("Sadly, ...", "Even ...")."""
    head, comma, _ = t.partition(",")
    return (bool(comma) and len(head.split()) <= 4) or "overall" in t or t.startswith(
        ("Even", "If", "Although", "Unless", "For all", "Both"))


_DIGIT_SLOTS = {"hi": (7, 10), "lo": (1, 4), "mid": (5, 6), "mix": (5, 7)}


class _Review:
    """State for one review: tense, film noun, aspects and templates used."""

    def __init__(self, rng: random.Random, label: str):
        self.rng = rng
        self.label = label
        self.past = rng.random() < 0.5
        r = rng.random()
        if r < 0.45:
            self.film, self.films = rng.choice(_FILM_GENERIC)
        elif r < 0.55:
            self.film, self.films = rng.choice(_FILM_OTHER)
        else:
            self.film, self.films = rng.choice(_GENRES)
        self.genre_films = rng.choice(_GENRES)[1]
        self.used_aspects: set[str] = set()
        self.used_templates: set[str] = set()
        self.judged = False  # has an evaluative sentence been emitted?
        self.rated = False
        self.topics: frozenset[str] = frozenset()
        self.last_template = ""

    # -- pieces -----------------------------------------------------------
    def aspect(self):
        rng = self.rng
        while True:
            a = _ASPECT_LIST[rng.randrange(len(_ASPECT_LIST))]
            if a[0] not in self.used_aspects:
                self.used_aspects.add(a[0])
                return a

    def be(self, plural: bool, past: bool | None = None) -> str:
        past = self.past if past is None else past
        if past:
            return "were" if plural else "was"
        return "are" if plural else "is"

    def adj(self, cat: str, positive: bool, intensify: bool = True, avoid: str = "") -> str:
        rng = self.rng
        table = _POS_BY_CAT[cat] if positive else _NEG_BY_CAT[cat]
        while True:
            word, grade = _weighted_grade(rng, table)
            if word != avoid:
                break
        if not intensify:
            return word
        ints = (_POS_INT if positive else _NEG_INT)[grade]
        while True:
            i = ints[rng.randrange(len(ints))]
            if i != "perfectly " or word in _PERFECTLY_OK:
                return i + word

    def generic_adj(self, positive: bool, attributive: bool = False, min_grade: int = 1) -> str:
        rng = self.rng
        while True:
            word, grade = _weighted_grade(rng, _GEN_POS if positive else _GEN_NEG)
            if grade >= min_grade:
                break
        ints = (_POS_INT if positive else _NEG_INT)[grade]
        while True:
            i = ints[rng.randrange(len(ints))]
            if attributive and i in ("so ", "just ", "quite "):  # not "a so clever film"
                continue
            if i != "perfectly " or word in _PERFECTLY_OK:
                return i + word

    def hedge(self) -> str:
        """A small complaint that still ends positive."""
        rng = self.rng
        text, plural, cat = self.aspect()
        if rng.random() < 0.5:
            flaw = "a bit too " + rng.choice(_TOO_ADJ[cat])
        else:
            flaw = rng.choice(_MILD_INT) + rng.choice(_MILD_NEG_BY_CAT[cat])
        it_is = "it was" if self.past else "it is"
        if rng.random() < 0.6:
            end = f"but {it_is} still {_article(self.generic_adj(True, attributive=True))} {self.film}."
        else:
            end = "but I still enjoyed it."
        return _cap(f"the {text} {self.be(plural)} {flaw} in places, {end}")

    # -- templates --------------------------------------------------------
    def _fill(self, template: str) -> str:
        rng = self.rng
        f: dict[str, str] = {}
        need = set(m.group(0)[1:-1] for m in _SLOT_RE.finditer(template))
        a1 = a2 = None
        if need & {"asp", "be", "bep", "stands", "lets", "pos", "neg", "pos_b", "neg_b",
                   "Pos_bare", "Neg_bare", "pos_bare", "dull", "dull2", "good", "good2", "too",
                   "pos_shared", "neg_shared", "neu"}:
            a1 = self.aspect()
            f["asp"] = a1[0]
            f["be"] = self.be(a1[1])
            f["bep"] = self.be(a1[1], past=True)
            if self.past:
                f["stands"], f["lets"] = "stood", "let"
            else:
                f["stands"], f["lets"] = ("stand", "let") if a1[1] else ("stands", "lets")
        if need & {"asp2", "be2", "pos2", "neg2", "pos2_bare", "neg2_bare"}:
            a2 = self.aspect()
            f["asp2"] = a2[0]
            f["be2"] = self.be(a2[1])
        who = None
        for key in sorted(need):
            if key in f:
                continue
            if key == "pos":
                f[key] = self.adj(a1[2], True)
            elif key == "neg":
                f[key] = self.adj(a1[2], False)
            elif key == "pos_b":
                f[key] = self.adj(a1[2], True, intensify=False, avoid=f.get("pos", "").split(" ")[-1])
            elif key == "neg_b":
                f[key] = self.adj(a1[2], False, intensify=False, avoid=f.get("neg", "").split(" ")[-1])
            elif key in ("Pos_bare", "pos_bare"):
                w = self.adj(a1[2], True, intensify=False)
                f[key] = _cap(w) if key[0] == "P" else w
            elif key in ("Neg_bare", "neg_bare"):
                w = self.adj(a1[2], False, intensify=False)
                f[key] = _cap(w) if key[0] == "N" else w
            elif key == "pos2":
                f[key] = self.adj(a2[2], True)
            elif key == "neg2":
                f[key] = self.adj(a2[2], False)
            elif key == "pos2_bare":
                f[key] = self.adj(a2[2], True, intensify=False)
            elif key == "neg2_bare":
                f[key] = self.adj(a2[2], False, intensify=False)
            elif key == "pos_shared":
                f[key] = self.generic_adj(True)
            elif key == "neg_shared":
                f[key] = self.generic_adj(False)
            elif key == "a_pos":
                f[key] = _article(self.generic_adj(True, attributive=True))
            elif key == "a_neg":
                f[key] = _article(self.generic_adj(False, attributive=True))
            elif key == "a_pos_strong":
                f[key] = _article(self.generic_adj(True, attributive=True, min_grade=2))
            elif key == "a_neg_strong":
                f[key] = _article(self.generic_adj(False, attributive=True, min_grade=2))
            elif key == "a_neu":
                f[key] = _article(rng.choice(_NEU_ADJ))
            elif key in ("a_neg_asp", "a_neu_asp"):
                text, plural, cat = self.aspect()
                if key == "a_neg_asp":
                    adj = self.adj(cat, False, intensify=rng.random() < 0.3)
                else:
                    adj = rng.choice(_NEU_ADJ)
                phrase = adj + " " + text
                f[key] = phrase if plural or text in _UNCOUNTABLE else _article(phrase)
            elif key == "neu":
                f[key] = rng.choice(_NEU_ADJ)
            elif key == "too":
                f[key] = rng.choice(_TOO_ADJ[a1[2]])
            elif key == "dull":
                f[key] = rng.choice(_DULL_WORDS)
            elif key == "dull2":
                while True:
                    w = rng.choice(_DULL_WORDS)
                    if w != f.get("dull"):
                        break
                f[key] = w
            elif key == "good":
                f[key] = rng.choice(_GOOD_WORDS)
            elif key == "good2":
                while True:
                    w = rng.choice(_GOOD_WORDS)
                    if w != f.get("good"):
                        break
                f[key] = w
            elif key == "film":
                f[key] = self.film
            elif key == "a_film":
                f[key] = _article(self.film)
            elif key == "films":
                generic = self.film in ("movie", "film", "picture", "feature", "production")
                f[key] = self.films if not generic and rng.random() < 0.5 else self.genre_films
            elif key == "is":
                f[key] = "was" if self.past else "is"
            elif key == "pos_noun":
                f[key] = rng.choice(_POS_NOUNS)
            elif key == "neg_noun":
                f[key] = rng.choice(_NEG_NOUNS)
            elif key == "like":
                f[key] = rng.choice(_LIKE_VERBS)
            elif key == "likes":
                f[key] = rng.choice(_LIKES_VERBS)
            elif key == "into":
                f[key] = rng.choice(_INTO_VERBS)
            elif key.lower().removesuffix("_d") in _DIGIT_SLOTS:
                lo, hi = _DIGIT_SLOTS[key.lower().removesuffix("_d")]
                n = rng.randint(lo, hi)
                if key.endswith("_d"):
                    f[key] = str(n)
                else:
                    f[key] = _cap(_NUMBER_WORDS[n]) if key[0].isupper() else _NUMBER_WORDS[n]
            elif key in ("who", "does"):
                if who is None:
                    who = rng.choice(_PROTAGONISTS)
                    act = rng.choice(_PLOT_ACTIONS)
                    f["who"] = who[0]
                    f["does"] = _plural_verb_phrase(act) if who[1] else act
            elif key == "where":
                f[key] = rng.choice(_SETTINGS)
            elif key == "source":
                f[key] = rng.choice(_SOURCES)
            elif key == "length":
                f[key] = rng.choice(_LENGTHS)
            elif key == "when":
                f[key] = rng.choice(_WHEN)
            elif key == "company":
                f[key] = rng.choice(_COMPANIONS)
            elif key == "ordinal":
                f[key] = rng.choice(_ORDINALS)
            elif key == "expect":
                f[key] = rng.choice(_EXPECTATIONS)
            else:  # pragma: no cover - a typo in a template
                raise KeyError(f"unknown slot {{{key}}} in template {template!r}")
        return _cap(template.format(**f))

    def pick(self, templates, plain: bool = False) -> str:
        """Fill a random template not yet used in this review.

        ``plain`` excludes templates that lean on an earlier judgement.  At most
        one rating per review.
        """
        rng = self.rng
        for _ in range(50):
            t = templates[rng.randrange(len(templates))]
            if t in self.used_templates:
                continue
            if (plain or not self.judged) and _is_additive(t):
                continue
            if self.rated and _is_rating(t):
                continue
            if _topics(t) & self.topics:
                continue
            break
        self.used_templates.add(t)
        self.topics |= _topics(t)
        self.last_template = t
        self.rated = self.rated or _is_rating(t)
        return self._fill(t)


def _body(rv: _Review) -> list[tuple[str, str]]:
    """The sentences of one review as ``(text, kind)``, kind in desc/judge/close."""
    rng, label = rv.rng, rv.label
    out: list[tuple[str, str]] = []

    def judge(templates, plain=False):
        out.append((rv.pick(templates, plain=plain), "judge"))
        rv.judged = True

    if rng.random() < 0.3:
        out.append((rv.pick(_T_DESCRIBE), "desc"))
    if label in ("positive", "negative"):
        pos = label == "positive"
        aspect_t = _T_POS_ASPECT if pos else _T_NEG_ASPECT
        film_t = _T_POS_FILM if pos else _T_NEG_FILM
        negation_t = _T_POS_NEGATION if pos else _T_NEG_NEGATION
        for _ in range(rng.choice((1, 2, 2, 3))):
            r = rng.random()
            judge(aspect_t if r < 0.5 else film_t if r < 0.8 else negation_t)
        if pos and rng.random() < 0.15:  # a small hedge keeps some reviews short of glowing
            out.append((rv.hedge(), "judge"))
        if rng.random() < 0.6:
            out.append((rv.pick(_T_POS_CLOSE if pos else _T_NEG_CLOSE), "close"))
    elif label == "neutral":
        for _ in range(rng.choice((1, 2, 2))):
            if rng.random() < 0.55:
                out.append((rv.pick(_T_NEU), "judge"))
            else:
                out.append((rv.pick(_T_DESCRIBE), "desc"))
    else:  # mixed
        if rng.random() < 0.6:
            judge(_T_MIXED)
        else:
            first_pos = rng.random() < 0.5
            judge(_T_POS_ASPECT if first_pos else _T_NEG_ASPECT, plain=True)
            second = rv.pick(_T_NEG_ASPECT if first_pos else _T_POS_ASPECT, plain=True)
            if rng.random() < 0.5 and not rv.last_template.startswith("{"):
                second = _prefix(rng.choice(_TURNS[not first_pos]), second)
            out.append((second, "judge"))
        if rng.random() < 0.5:
            out.append((rv.pick(_T_MIXED_CLOSE), "close"))
    return out


def _n_words(s: str) -> int:
    return s.count(" ") + 1


def _one_review(rng: random.Random, label: str) -> str:
    rv = _Review(rng, label)
    sents = _body(rv)
    # Keep it to 1-4 sentences and roughly 12-60 words.
    while len(sents) > 4:
        sents.pop(rng.randrange(len(sents)))
    n_words = sum(_n_words(s) for s, _ in sents)
    tries = 0
    while n_words < 12 and len(sents) < 4 and tries < 4:
        tries += 1
        if label in ("neutral", "mixed") or rng.random() < 0.5:
            extra = (rv.pick(_T_DESCRIBE), "desc")
            sents.insert(0, extra)
        else:
            extra = (rv.pick(_T_POS_CLOSE if label == "positive" else _T_NEG_CLOSE), "close")
            sents.append(extra)
        n_words += _n_words(extra[0])
    while n_words > 60 and len(sents) > 1:
        n_words -= _n_words(sents.pop()[0])
    texts = [s for s, _ in sents]
    if len(sents) > 1 and sents[-1][1] != "desc" and rng.random() < 0.12 \
            and not _is_rating(texts[-1]) and not _has_connective(texts[-1]):
        texts[-1] = _prefix(rng.choice(_OPENERS[label]), texts[-1])
    return " ".join(texts)


def generate_labeled_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct ``(text, sentiment)`` pairs, deterministic for ``seed``.

    Sentiments are drawn with weights 0.3/0.3/0.2/0.2 for positive, negative,
    neutral and mixed.  Raises ``ValueError`` if ``n`` is negative or more than
    the grammar can make distinct in a reasonable number of tries.
    """
    if isinstance(n, bool):
        raise TypeError("n must be an int, got bool")
    n = operator.index(n)  # TypeError for floats and strings; numpy ints are fine
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > MAX_REVIEWS:
        raise ValueError(
            f"asked for {n:,} distinct reviews, but the built-in grammar is only meant to "
            f"supply up to MAX_REVIEWS={MAX_REVIEWS:,}; use a smaller corpus (or repeat epochs)"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    max_tries = 20 * n + 1000
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"could only make {len(out):,} distinct reviews in {max_tries:,} tries "
                f"(asked for {n:,}); the grammar is close to exhausted, ask for fewer"
            )
        label = rng.choices(SENTIMENTS, weights=_LABEL_WEIGHTS)[0]
        text = _one_review(rng, label)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, label))
    return out


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """The texts of :func:`generate_labeled_reviews`."""
    return [text for text, _ in generate_labeled_reviews(n, seed)]


def write_corpus(path, n: int, seed: int = 0) -> Path:
    """Write ``n`` reviews to ``path``, one per line, UTF-8; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = generate_reviews(n, seed)
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# The English-word metric
# ---------------------------------------------------------------------------
_WORD_RE = re.compile(r"(?:[^\W\d_]|')+")
_CONTRACTION_PIECES = frozenset({"n't", "'s", "'re", "'ll", "'ve", "'d", "'m"})
# Common function words and contractions the web2/gcide lists lack.  This is
# about English in general, not about this grammar's lexicon.
_FUNCTION_WORDS = frozenset({
    "i", "a", "an", "the", "and", "or", "but", "to", "of", "in", "on", "at", "is", "it",
    "i'm", "i've", "i'd", "i'll", "you're", "you've", "you'll", "you'd", "he's", "she's",
    "it's", "we're", "we've", "we'll", "we'd", "they're", "they've", "they'll", "they'd",
    "that's", "there's", "here's", "what's", "who's", "let's", "he'd", "she'd", "he'll",
    "she'll", "isn't", "aren't", "wasn't", "weren't", "don't", "doesn't", "didn't", "won't",
    "wouldn't", "can't", "couldn't", "shouldn't", "haven't", "hasn't", "hadn't", "mustn't",
    "needn't", "shan't", "ain't", "o'clock", "ma'am", "y'all",
})
_NT_STEMS = frozenset({"ca", "wo", "sha", "ai"})  # can't, won't, shan't, ain't
_VOWELS = set("aeiou")


def words(text: str) -> list[str]:
    """Lowercase word tokens: runs of letters and apostrophes.

    Curly apostrophes count as straight ones; quotes around a word are dropped
    (``'hello'`` -> ``hello``) but contraction pieces such as ``'s`` or ``n't``
    standing alone are kept.
    """
    toks = []
    for m in _WORD_RE.finditer(text.lower().replace("\u2019", "'").replace("\u2018", "'")):
        t = m.group(0)
        if t not in _CONTRACTION_PIECES:
            t = t.strip("'")
        if t:
            toks.append(t)
    return toks


@functools.lru_cache(maxsize=1)
def _dictionary() -> frozenset[str]:
    from english_words import get_english_words_set  # loads a large word list: only the word-share check needs it

    return frozenset(get_english_words_set(["web2", "gcide"], lower=True))


def _stem_candidates(w: str):
    """Possible base forms of an inflected word (one suffix removed)."""
    n = len(w)

    def undouble(stem):
        # "stopped" -> "stopp" -> "stop"; "bigger" -> "bigg" -> "big"
        if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS:
            yield stem[:-1]

    if w.endswith("ies") and n > 4:
        yield w[:-3] + "y"
    if w.endswith("ied") and n > 4:
        yield w[:-3] + "y"
    if w.endswith("ier") and n > 4:
        yield w[:-3] + "y"
    if w.endswith("iest") and n > 5:
        yield w[:-4] + "y"
    if w.endswith("ily") and n > 4:
        yield w[:-3] + "y"
    if w.endswith("es") and n > 3:
        yield w[:-2]
    if w.endswith("s") and not w.endswith("ss") and n > 2:
        yield w[:-1]
    if w.endswith("ed") and n > 3:
        stem = w[:-2]
        yield stem
        yield w[:-1]  # loved -> love
        yield from undouble(stem)
    if w.endswith("ing") and n > 4:
        stem = w[:-3]
        yield stem
        yield stem + "e"  # loving -> love
        yield from undouble(stem)
    if w.endswith("er") and n > 3:
        stem = w[:-2]
        yield stem
        yield w[:-1]  # nicer -> nice
        yield from undouble(stem)
    if w.endswith("est") and n > 4:
        stem = w[:-3]
        yield stem
        yield w[:-2]  # nicest -> nice
        yield from undouble(stem)
    if w.endswith("ly") and n > 3:
        yield w[:-2]
        yield w[:-1] + "e"  # gently -> gentle
        if w.endswith("ally") and n > 5:
            yield w[:-4]  # basically -> basic


@functools.lru_cache(maxsize=65536)
def is_english_word(word: str) -> bool:
    """Whether one lowercase word token is a real English word.

    Accepted: a word in the ``english_words`` web2/gcide dictionaries; the same
    with one inflectional suffix removed (s/es/ed/d/ing/er/est/ly, with
    e-restoration, undoubled consonants and y/ies); a contraction piece
    (``n't``, ``'s``, ...); a common function word or contraction the
    dictionaries lack; ``X's``/``X're``/``X'll``/``X've``/``X'd``/``X'm``/``Xn't``
    where ``X`` is itself English.  Deliberately independent of the review
    grammar's lexicon.
    """
    w = word.lower()
    if not w:
        return False
    if w in _CONTRACTION_PIECES or w in _FUNCTION_WORDS:
        return True
    d = _dictionary()
    if "'" in w:
        if w.endswith("n't"):
            base = w[:-3]
            return base in _NT_STEMS or ("'" not in base and is_english_word(base))
        for piece in ("'s", "'re", "'ll", "'ve", "'d", "'m"):
            if w.endswith(piece):
                base = w[: -len(piece)]
                return bool(base) and "'" not in base and is_english_word(base)
        if w.endswith("s'"):  # plural possessive: "actors'"
            return is_english_word(w[:-1])
        return False
    if w in d:
        return True
    return any(len(c) >= 2 and c in d for c in _stem_candidates(w))


def english_word_share(texts) -> float:
    """Share of word tokens (over all ``texts``) that are real English words.

    Tokens are :func:`words`; each is judged by :func:`is_english_word`.
    Raises ``ValueError`` if the texts hold no word at all.
    """
    if isinstance(texts, str):
        texts = [texts]
    total = good = 0
    for t in texts:
        for w in words(t):
            total += 1
            good += is_english_word(w)
    if total == 0:
        raise ValueError("no words to score: the texts are empty or hold no letters")
    return good / total
