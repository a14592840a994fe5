"""Prompts for the controlled-sentiment task, written by the logitsam team.

Each prompt asks for a short (one- or two-sentence) review, description, message or continuation about
something one can like or dislike: a product, film, book, restaurant, hotel, place, event, app, game,
service or experience. None says which way to lean, so the sentiment of a response is the model's own
choice and a meaningful preference signal (the DPO paper's IMDb task, §6.1, uses movie-review prefixes
the same way). A few subjects hold words VADER scores (a "horror film", a "charity fun run", a "romantic
comedy"); a response that repeats them shifts every score of that prompt alike, and a pair only ever
compares responses to the same prompt.

`PROMPTS` is built from a table of categories: every subject gets three of four forms (review,
description, message to someone, continuation of a review), the left-out form and each form's wording
rotating with the subject's position, so neighbouring prompts read differently.
"""

from __future__ import annotations

from typing import NamedTuple


class Category(NamedTuple):
    """Subjects of one kind, with the verbs that fit them ("stayed at", "stay at", "stayed at")."""

    past: str  # "you ___ last weekend"
    infinitive: str  # "what it was like to ___ it"
    participle: str  # "someone who has never ___ one"
    subjects: tuple[tuple[str, str], ...]  # (noun phrase with a/an, short name for openers)
    openers: tuple[str, ...]  # review beginnings; {short} is the subject's short name


CATEGORIES: dict[str, Category] = {
    "products": Category("bought", "use", "used", (
        ("a stainless steel blender", "blender"),
        ("a pair of wireless earbuds", "earbuds"),
        ("a budget smartphone", "phone"),
        ("a robot vacuum cleaner", "vacuum"),
        ("an electric kettle", "kettle"),
        ("a hiking backpack", "backpack"),
        ("a standing desk", "desk"),
        ("a cast-iron frying pan", "pan"),
        ("a mechanical keyboard", "keyboard"),
        ("a pair of running shoes", "shoes"),
        ("a portable phone charger", "charger"),
        ("a memory foam pillow", "pillow"),
    ), (
        "The {short} arrived yesterday and",
        "After a month with the {short}, I",
        "I unpacked the {short} this morning and",
        "My first impression of the {short} is that",
    )),
    "films": Category("watched", "watch", "watched", (
        ("a science-fiction film about a stranded astronaut", "sci-fi film"),
        ("a romantic comedy set in Paris", "romantic comedy"),
        ("a documentary about honeybees", "documentary"),
        ("an animated film about a lost dog", "animated film"),
        ("a courtroom drama", "courtroom drama"),
        ("a horror film set in an old farmhouse", "horror film"),
        ("a three-hour historical epic", "epic"),
        ("a low-budget indie comedy", "comedy"),
        ("a superhero sequel", "sequel"),
        ("a black-and-white silent film", "silent film"),
        ("a musical about a travelling circus", "musical"),
        ("a spy thriller set in Berlin", "thriller"),
    ), (
        "I watched the {short} last night and",
        "The opening scene of the {short}",
        "When the credits of the {short} rolled, I",
        "The {short} runs for about two hours, and",
    )),
    "books": Category("read", "read", "read", (
        ("a mystery novel set in a fishing village", "mystery"),
        ("a cookbook of weeknight dinners", "cookbook"),
        ("a biography of a jazz musician", "biography"),
        ("a fantasy novel about a dragon rider", "fantasy novel"),
        ("a self-help book about habits", "self-help book"),
        ("a collection of short stories", "collection"),
        ("a children's picture book about the sea", "picture book"),
        ("a popular-science book about black holes", "science book"),
        ("a travel memoir about crossing Africa by bus", "memoir"),
        ("a graphic novel about a robot", "graphic novel"),
        ("a poetry collection about city life", "poetry collection"),
        ("a thriller about a missing scientist", "thriller"),
    ), (
        "I finished the {short} over the weekend and",
        "The first chapter of the {short}",
        "Halfway through the {short}, I",
        "I read the {short} on a long train ride, and",
    )),
    "restaurants": Category("ate at", "eat at", "eaten at", (
        ("a family-run Italian restaurant", "Italian place"),
        ("a ramen shop near the university", "ramen shop"),
        ("a vegan cafe", "cafe"),
        ("a food truck selling tacos", "food truck"),
        ("a sushi bar in a shopping mall", "sushi bar"),
        ("a steakhouse downtown", "steakhouse"),
        ("a breakfast diner on the highway", "diner"),
        ("an Indian buffet", "buffet"),
        ("a rooftop bar that serves small plates", "bar"),
        ("a bakery that opened last month", "bakery"),
        ("a seafood restaurant by the harbour", "seafood place"),
        ("a fast-food burger chain", "burger place"),
    ), (
        "We had dinner at the {short} on Friday and",
        "The waiter at the {short}",
        "I ordered the special at the {short}, and",
        "The {short} was full when we arrived, and",
    )),
    "hotels": Category("stayed at", "stay at", "stayed at", (
        ("a budget hotel near a train station", "budget hotel"),
        ("a beachfront resort", "resort"),
        ("a bed and breakfast in the countryside", "B&B"),
        ("a hostel in the city centre", "hostel"),
        ("an airport hotel", "airport hotel"),
        ("a ski lodge", "lodge"),
        ("a boutique hotel in an old factory", "boutique hotel"),
        ("a motel off the highway", "motel"),
        ("a seaside inn", "inn"),
        ("a family-run guesthouse", "guesthouse"),
        ("a capsule hotel", "capsule hotel"),
        ("a castle converted into a hotel", "castle hotel"),
    ), (
        "We checked into the {short} late at night and",
        "Our room at the {short}",
        "The location of the {short}",
        "Breakfast at the {short}",
    )),
    "places": Category("visited", "visit", "visited", (
        ("a seaside town in early spring", "town"),
        ("a natural history museum", "museum"),
        ("a botanical garden", "garden"),
        ("a mountain village", "village"),
        ("a city aquarium", "aquarium"),
        ("a national park", "park"),
        ("a medieval castle", "castle"),
        ("a night market", "market"),
        ("a small island reachable only by ferry", "island"),
        ("a modern art gallery", "gallery"),
        ("a zoo", "zoo"),
        ("a lighthouse on the coast", "lighthouse"),
    ), (
        "We spent the afternoon exploring the {short} and",
        "Getting to the {short} took about an hour, and",
        "The first thing I noticed about the {short} was",
        "Our visit to the {short}",
    )),
    "events": Category("went to", "go to", "been to", (
        ("a jazz concert in a city park", "concert"),
        ("a local food festival", "festival"),
        ("a wedding reception in a barn", "reception"),
        ("a tech conference", "conference"),
        ("a stand-up comedy night", "show"),
        ("a football match", "match"),
        ("a school play", "play"),
        ("a charity fun run", "run"),
        ("a book signing", "signing"),
        ("an outdoor cinema screening", "screening"),
        ("a fireworks display", "display"),
        ("a classical music recital", "recital"),
    ), (
        "The {short} started at seven, and",
        "By the end of the {short}, I",
        "We arrived early for the {short} and",
        "The crowd at the {short}",
    )),
    "apps": Category("used", "use", "used", (
        ("a meditation app", "meditation app"),
        ("a budgeting app", "budgeting app"),
        ("a language-learning app", "language-learning app"),
        ("a photo-editing app", "photo-editing app"),
        ("a food delivery app", "food delivery app"),
        ("a fitness tracking app", "fitness tracking app"),
        ("a note-taking app", "note-taking app"),
        ("a weather app", "weather app"),
        ("a ride-sharing app", "ride-sharing app"),
        ("a banking app", "banking app"),
        ("a podcast player", "podcast player"),
        ("a password manager", "password manager"),
    ), (
        "I installed the {short} last week and",
        "After the latest update, the {short}",
        "I open the {short} every morning, and",
        "Setting up the {short} took",
    )),
    "games": Category("played", "play", "played", (
        ("a puzzle game for mobile phones", "puzzle game"),
        ("an open-world fantasy game", "fantasy game"),
        ("a board game for four players", "board game"),
        ("a racing game", "racing game"),
        ("a farming simulator", "farming simulator"),
        ("a card game for two players", "card game"),
        ("a multiplayer shooter", "shooter"),
        ("a retro platformer", "platformer"),
        ("a city-building game", "city-builder"),
        ("a virtual reality game", "VR game"),
        ("a cooperative escape-room board game", "escape-room game"),
        ("a mobile word game", "word game"),
    ), (
        "I played the {short} for three hours last night, and",
        "The tutorial of the {short}",
        "My friends and I tried the {short} on Saturday and",
        "The {short} costs twenty dollars, and",
    )),
    "services": Category("used", "use", "used", (
        ("a same-day laundry service", "laundry service"),
        ("a moving company", "moving company"),
        ("an online grocery delivery service", "delivery service"),
        ("a car rental agency at the airport", "rental agency"),
        ("a dog-walking service", "dog walker"),
        ("a house-cleaning service", "cleaning service"),
        ("a bike repair shop", "repair shop"),
        ("a self-service car wash", "car wash"),
        ("a phone repair service", "repair service"),
        ("a tax preparation service", "tax service"),
        ("a meal-kit subscription", "meal kit"),
        ("a music streaming service", "streaming service"),
    ), (
        "I booked the {short} on Monday and",
        "I called the {short} twice, and",
        "This was my first time using the {short}, and",
        "The {short} charged me forty dollars, and",
    )),
    "experiences": Category("tried", "try", "tried", (
        ("a cooking class for beginners", "class"),
        ("a hot-air balloon ride", "ride"),
        ("a yoga retreat", "retreat"),
        ("a guided walking tour", "tour"),
        ("a scuba diving lesson", "lesson"),
        ("a pottery workshop", "workshop"),
        ("a wine tasting", "tasting"),
        ("an escape room", "escape room"),
        ("a long-distance train journey", "journey"),
        ("a spa day", "spa day"),
        ("a rock climbing gym", "gym"),
        ("a salsa dance class", "class"),
    ), (
        "I signed up for the {short} on a whim and",
        "The {short} lasted about three hours, and",
        "At the end of the {short}, I",
        "We booked the {short} for my birthday, and",
    )),
}

# {a}: "a budget hotel ..."; {the}: "the budget hotel ..."; verbs from the category.
REVIEWS = (
    "Write a two-sentence review of {a}.",
    "Write a one-sentence review of {a}.",
    "Write a short online review of {a}, two sentences at most.",
    "Review {a} in one or two sentences.",
)
DESCRIPTIONS = (
    "Describe {a} in two sentences.",
    "In one or two sentences, describe what it was like to {infinitive} {a}.",
    "Give a two-sentence description of {a} for someone who has never {participle} one.",
    "Describe {a} to a friend in one sentence.",
)
MESSAGES = (
    "Write a short text message to a friend about {a} you {past} last weekend.",
    "Your friend asks what you thought of {the} you {past}. Reply in one or two sentences.",
    "Write a two-sentence message to a coworker about {a} you {past} on Saturday.",
    "Send your sister a one- or two-sentence text about {a} you {past} recently.",
)
CONTINUATIONS = (
    'Continue this review in one or two sentences: "{opener}"',
    "Continue this online review: '{opener}'",
    'Complete this review with one or two sentences: "{opener}"',
    'Here is the start of a review: "{opener}" Continue it in one or two sentences.',
)
FORMS = (REVIEWS, DESCRIPTIONS, MESSAGES, CONTINUATIONS)


def _the(noun_phrase: str) -> str:
    article, rest = noun_phrase.split(" ", 1)
    assert article in ("a", "an"), noun_phrase
    return "the " + rest


def build_prompts() -> list[str]:
    """All prompts, in table order, without duplicates."""
    prompts = []
    for category in CATEGORIES.values():
        for i, (a, short) in enumerate(category.subjects):
            k = i + i // len(FORMS)  # shifts the wordings every cycle of forms, so all of them get used
            fields = {
                "a": a, "the": _the(a), "past": category.past, "infinitive": category.infinitive,
                "participle": category.participle,
                "opener": category.openers[k % len(category.openers)].format(short=short),
            }
            for f, templates in enumerate(FORMS):
                if f == i % len(FORMS):
                    continue  # each subject gets three of the four forms
                prompts.append(templates[k % len(templates)].format(**fields))
    return list(dict.fromkeys(prompts))


PROMPTS: list[str] = build_prompts()
