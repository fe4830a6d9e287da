"""Generate perfusion_ops/data/captions.txt, the caption corpus the covariance C is estimated on (docs/method.md §3).

Each caption is an ordinary prompt from the word lists below (subjects, attributes, places, actions,
photographic and art styles) followed by a tail of comma-separated tags, as users write prompts. The tails cover
the text encoders' vocabulary: every whole-word token of the CLIP BPE vocabulary (the one SD1.x's CLIP-L, SD2.x's
OpenCLIP-H and SDXL's CLIP-L and bigG all use) whose word is ASCII letters or digits appears COVERAGE_REPEATS
times, and further tags are drawn with a Zipf law over the BPE merge rank (earlier merges are more frequent
pairs in CLIP's training text, so rank stands in for word frequency). Without the tails, the directions of words
the prompts never use are held up only by the ridge of C's inverse, and a concept's gate r is arbitrary on them.
The CLIP text encoder is causal, so a tail does not change the encodings of the prompt before it.

Written by this project and released with the pack under its MIT license; the vocabulary is read from ComfyUI's
copy of the CLIP tokenizer. Deterministic: `python tools/make_caption_corpus.py` (with ComfyUI found as the tests
find it) always writes the same file.
"""
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # support/ (after ComfyUI)
from support import comfy_host  # noqa: E402

TARGET = REPO / "perfusion_ops" / "data" / "captions.txt"
CAPTIONS = 4000
COVERAGE_REPEATS = 2   # times each vocabulary word appears in a tail
ZIPF_TAGS = 4          # further tags per caption, drawn by frequency
ZIPF_OFFSET = 10       # p(word) ∝ 1 / (rank + ZIPF_OFFSET)
MAX_TOKENS = 75        # one 77-token chunk with BOS and EOS: the estimator reads each caption's first chunk only
WHOLE_WORD = re.compile(r"[a-z0-9]+")

SUBJECTS = """man woman child baby girl boy old man old woman couple family crowd soldier chef doctor nurse farmer
astronaut knight wizard witch pirate robot cyborg alien angel demon ghost vampire zombie mermaid fairy king queen
princess prince cowboy ninja samurai monk dancer singer guitarist drummer painter athlete runner swimmer surfer
skier climber cyclist dog puppy cat kitten horse pony cow bull sheep goat pig rabbit hamster mouse rat squirrel fox
wolf bear polar bear panda koala kangaroo lion tiger leopard cheetah elephant giraffe zebra rhino hippo monkey gorilla
deer moose camel llama owl eagle hawk parrot penguin flamingo swan duck chicken rooster peacock hummingbird crow
pigeon butterfly bee ladybug spider ant dragonfly snail frog turtle lizard snake crocodile dinosaur dragon unicorn
phoenix fish shark whale dolphin octopus jellyfish crab lobster seahorse teddy bear doll toy car toy robot puppet
car truck bus motorcycle bicycle scooter train tram airplane helicopter rocket spaceship boat sailboat ship submarine
tractor taxi van jeep house cottage cabin castle palace tower skyscraper lighthouse bridge church temple mosque barn
windmill tent igloo treehouse chair table sofa bed lamp clock mirror bookshelf piano guitar violin drum trumpet
camera phone laptop computer television radio teapot cup mug bowl plate vase pot jar bottle glass basket bag backpack
suitcase hat cap helmet crown mask glasses shoe boot sneaker dress shirt jacket coat scarf umbrella sword shield bow
axe hammer key lock book newspaper letter map globe candle lantern balloon kite ball football basketball skateboard
apple banana orange lemon strawberry cherry grape watermelon pineapple pear peach avocado tomato carrot potato
pumpkin mushroom broccoli corn bread cake cupcake cookie donut pizza burger sandwich sushi noodles soup salad
ice cream chocolate coffee tea juice wine beer flower rose tulip sunflower daisy lily orchid cactus tree oak tree
pine tree palm tree bonsai forest mountain volcano waterfall river lake ocean beach island desert canyon cave
glacier meadow field garden park street alley road highway city village town harbor market station airport
statue sculpture fountain monument painting poster sign graffiti mural stained glass window door gate fence wall
staircase cathedral ruins pyramid planet moon sun star galaxy nebula cloud rainbow storm lightning snowflake""".split("\n")

COMPOUND_SUBJECTS = ["old man", "old woman", "polar bear", "teddy bear", "toy car", "toy robot", "oak tree", "pine tree",
                     "palm tree", "ice cream", "stained glass window", "hot air balloon", "fire truck", "race car"]

ADJECTIVES = """red orange yellow green blue purple pink brown black white gray golden silver bronze colorful pastel
neon dark bright pale vivid faded shiny matte glossy rusty wooden metal plastic glass stone marble ceramic paper
fabric knitted furry fluffy hairy feathered scaly smooth rough wet dry frozen burning glowing transparent tiny small
large huge giant tall short long round square old new ancient modern futuristic vintage retro broken dirty clean
cute adorable scary friendly angry happy sad sleepy curious elegant beautiful ugly strange mysterious cozy lonely
abandoned crowded empty busy quiet peaceful chaotic striped spotted checkered floral patterned embroidered""".split()

PLACES = """on the beach|in the forest|in the desert|on a mountain top|in the snow|in the rain|under the sea|in space|
on the moon|in a city street|in a busy market|in a quiet village|in a garden|in a park|on a farm|in a field of flowers|
in the kitchen|in the living room|in a bedroom|in a library|in a classroom|in an office|in a museum|in a cafe|
in a restaurant|at a train station|at the airport|on a boat|on a bridge|in a cave|in the jungle|by a lake|
by the river|next to a waterfall|on a rooftop|in a castle|in a church|in a laboratory|in a workshop|on a stage|
in a stadium|at a concert|on a table|on a shelf|on the floor|on a wooden chair|on a sofa|in a box|in a basket|
in front of a house|in front of the eiffel tower|in times square|in tokyo at night|in a snowy street|
at sunset|at sunrise|at night|in the fog|under the stars|in autumn leaves|in a sunflower field|
against a white background|against a black background|on a blue background|on a red carpet|in a dark room""".replace("\n", "").split("|")

ACTIONS = """sitting|standing|running|jumping|sleeping|flying|swimming|walking|dancing|reading a book|eating|drinking|
playing|smiling|laughing|looking at the camera|looking away|holding a flower|wearing a hat|wearing sunglasses|
riding a bicycle|playing the guitar|cooking|painting|fighting|hiding|floating|melting|falling|glowing""".replace("\n", "").split("|")

STYLES = """a photo of|a close-up photo of|a blurry photo of|a black and white photo of|a polaroid of|a cinematic shot of|
a studio portrait of|a macro photograph of|a wide angle photo of|an aerial photo of|a painting of|an oil painting of|
a watercolor painting of|a pencil sketch of|a charcoal drawing of|an ink drawing of|a digital illustration of|
a cartoon of|an anime drawing of|a comic book panel of|a pixel art image of|a 3d render of|a low poly model of|
a clay figure of|a mosaic of|a stained glass picture of|a tattoo of|a children's book illustration of|
a vintage poster of|a magazine cover with|a product shot of|a screenshot of a video game with|an origami|
a sculpture of|a plush toy of|a lego model of|a neon sign of|an embroidery of""".replace("\n", "").split("|")

EXTRAS = """, highly detailed|, 4k|, trending on artstation|, soft lighting|, dramatic lighting|, golden hour|, bokeh|
, shallow depth of field|, award winning|, in the style of van gogh|, in the style of studio ghibli|, by greg rutkowski|
, unreal engine|, film grain|, high contrast|, muted colors|, symmetrical|, minimalist|, hyperrealistic|, sharp focus""".replace("\n", "").split("|")


def prompts(count: int = CAPTIONS, seed: int = 0) -> list[str]:
    """Ordinary prompts from the word lists (the corpus before vocabulary tails were added)."""
    rng = random.Random(seed)
    subjects = sorted({word for line in SUBJECTS for word in line.split()} | set(COMPOUND_SUBJECTS))
    out = []
    for _ in range(count):
        subject = rng.choice(subjects)
        parts = [rng.choice(STYLES).strip()]
        article = "an" if subject[0] in "aeiou" else "a"
        if rng.random() < 0.6:
            adjective = rng.choice(ADJECTIVES)
            article = "an" if adjective[0] in "aeiou" else "a"
            parts.append(f"{article} {adjective} {subject}")
        else:
            parts.append(f"{article} {subject}")
        if rng.random() < 0.4:
            parts.append(rng.choice(ACTIONS).strip())
        if rng.random() < 0.7:
            parts.append(rng.choice(PLACES).strip())
        if rng.random() < 0.25:
            other = rng.choice(subjects)
            parts.append(f"with {'an' if other[0] in 'aeiou' else 'a'} {other}")
        caption = " ".join(parts)
        if rng.random() < 0.35:
            caption += rng.choice(EXTRAS).strip(" ")
        out.append(caption)
    return out


def vocabulary_words(vocab: dict[str, int]) -> list[str]:
    """The vocabulary's whole-word tokens whose word is ASCII letters or digits, in BPE merge order (by id)."""
    words = [(token_id, token[:-len("</w>")]) for token, token_id in vocab.items() if token.endswith("</w>")]
    return [word for _, word in sorted(words) if WHOLE_WORD.fullmatch(word)]


def tail(words: list[str], rng: random.Random) -> str:
    """Tags: the words in comma-separated groups of one to three."""
    groups, i = [], 0
    while i < len(words):
        size = rng.choice((1, 1, 2, 3))
        groups.append(" ".join(words[i:i + size]))
        i += size
    return ", ".join(groups)


def captions(vocab: dict[str, int], token_count, count: int = CAPTIONS, seed: int = 0) -> list[str]:
    """Each prompt with a tail that carries its share of the vocabulary (each word COVERAGE_REPEATS times, in a
    seeded order) and ZIPF_TAGS frequency-drawn tags; a tail that would push the caption past MAX_TOKENS
    (`token_count(caption)`, without BOS/EOS) gives its last coverage words to the next caption."""
    rng = random.Random(seed + 1)
    words = vocabulary_words(vocab)
    coverage = [word for _ in range(COVERAGE_REPEATS) for word in words]
    rng.shuffle(coverage)
    weights = [1.0 / (rank + ZIPF_OFFSET) for rank in range(len(words))]
    per_caption = -(-len(coverage) // count)
    out = []
    for index, prompt in enumerate(prompts(count, seed)):
        share = coverage[:per_caption] if index < count - 1 else coverage
        tags = share + rng.choices(words, weights, k=ZIPF_TAGS)
        rng.shuffle(tags)
        while tags and token_count(f"{prompt}, {tail(tags, random.Random(index))}") > MAX_TOKENS:
            tags.pop()
        used = [word for word in share if word in tags]
        remaining = list(coverage[len(share):])
        spilled = [word for word in share if word not in used]
        coverage = spilled + remaining  # words that did not fit go first into the next caption
        out.append(f"{prompt}, {tail(tags, random.Random(index))}" if tags else prompt)
    if coverage:
        raise SystemExit(f"{len(coverage)} vocabulary words did not fit into {count} captions; raise CAPTIONS")
    return out


def main() -> None:
    import transformers
    tokenizer_dir = comfy_host.required_comfyui(REPO) / "comfy" / "sd1_tokenizer"
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    count = lambda text: len(tokenizer(text)["input_ids"]) - 2  # noqa: E731  (without BOS and EOS)
    TARGET.write_text("\n".join(captions(vocab, count)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
