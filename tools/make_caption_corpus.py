"""Generate perfusion_ops/data/captions.txt, the caption corpus the covariance C is estimated on.

The corpus is written by this project (word lists below, released with the pack under its MIT
license). It spans many subjects, attributes, places, actions and photographic/art styles so that the
second moment of the text encoder's outputs covers ordinary prompts, not just one template.
Deterministic: `python tools/make_caption_corpus.py` always writes the same file.
"""
import random
from pathlib import Path

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


def captions(count: int = 4000, seed: int = 0) -> list[str]:
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


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "perfusion_ops" / "data" / "captions.txt"
    target.write_text("\n".join(captions()) + "\n", encoding="utf-8")
