"""Real-text prompts for a real model: sentences drawn from a small fixed corpus (written for this
harness, no download), cut at a word boundary so the tokenizer makes exactly the asked length.

A random-weight bench model takes random words ("w17 w3"); a real model should read text like
what users send, since the prompt's tokens (not only their count) decide how long its answers
take to tokenize and detokenize. Each prompt starts at a random word of a random sentence and
goes on with random sentences: prompts are reproducible from their index and unlikely to share
a prefix.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

SENTENCES: tuple[str, ...] = (
    "The morning train was late again, so most of the office arrived after the first meeting.",
    "She planted tomatoes, basil and two rows of beans along the south wall of the garden.",
    "A good map shows not only where the roads go but also where the hills make them slow.",
    "The library extended its opening hours during the exam weeks at the end of each term.",
    "Bread rises faster in a warm kitchen, but the flavour improves when the dough rests longer.",
    "Our team moved the weekly report to Thursday so that the numbers from Wednesday fit in.",
    "The bridge was closed for repairs, and the ferry ran every twenty minutes instead.",
    "He kept a notebook of every bird he saw, with the date, the weather and the place.",
    "Most small businesses fail not for lack of customers but because they run out of cash.",
    "When the power went out, the whole street gathered outside to watch the thunderstorm.",
    "The recipe calls for three eggs, a cup of flour, a pinch of salt and a little butter.",
    "Please send the signed contract back by Friday, together with a copy of your passport.",
    "The museum's new wing holds paintings that were stored in the basement for decades.",
    "Cycling to work takes twenty minutes longer than driving, but it is rarely delayed.",
    "The river flooded the lower fields twice this spring, and the farmers lost early crops.",
    "Teachers noticed that students remembered more when lessons ended with a short quiz.",
    "The hotel offered a late checkout because our flight did not leave until the evening.",
    "A small leak under the sink had soaked the cabinet floor before anyone noticed it.",
    "The orchestra rehearsed the symphony for six weeks before the first public concert.",
    "Prices at the market fall in the last hour, when sellers would rather not carry fruit home.",
    "The software update fixed the login problem but made the search page noticeably slower.",
    "Winter nights in the north are long, and people spend their evenings reading by the fire.",
    "My grandmother wrote letters every Sunday, and she expected an answer within the week.",
    "The council voted to turn the empty parking lot into a park with a playground.",
    "Researchers counted the frogs in the pond every night for three months last summer.",
    "The old lighthouse is now a small museum about the ships that sank along this coast.",
    "If the meeting runs long, we will move the design review to tomorrow morning.",
    "Children at the school grow vegetables and cook them together on Friday afternoons.",
    "The mountain path is steep near the top, so most hikers stop to rest by the lake.",
    "Her first novel sold only a few hundred copies, but the second one became a best seller.",
    "The bakery on the corner opens at six, and there is usually a queue by half past.",
    "Engineers tested the new engine in the desert, where the heat pushed it to its limits.",
    "A quiet room, a clear desk and a cup of tea are all he needs to write for hours.",
    "The city buses switched to electric motors, and the streets became noticeably quieter.",
    "We painted the kitchen yellow, which made the small room feel larger and brighter.",
    "The doctor suggested walking for half an hour every day and drinking more water.",
    "Volunteers cleaned the beach on Saturday and filled forty bags with plastic and glass.",
    "The chess club meets on Tuesday evenings in the back room of the community center.",
    "Snow closed the mountain pass, so the trucks waited in the valley for two days.",
    "The new phone has a better camera, but its battery barely lasts until the evening.",
    "Every autumn the village holds a harvest festival with music, dancing and apple pies.",
    "The professor answered every question patiently, even the ones she had heard many times.",
    "Our neighbors adopted a shy gray cat that now sleeps on their porch every afternoon.",
    "The factory added a night shift to keep up with the orders that came in before the holidays.",
    "A short walk after dinner helps many people sleep better and feel less tired in the morning.",
    "The archive keeps old newspapers on film, and visitors can read them on a large screen.",
    "He learned to sail on a small lake before he ever tried the open sea.",
    "The price of coffee rose sharply after a dry season in the countries that grow it.",
)


def text_prompt(tokenizer: Any, index: int, length: int, seed: int) -> str:
    """Prompt `index`: real text of exactly `length` tokens (no special tokens added).

    Words are appended while they fit; one that would overshoot is skipped (a later, shorter
    word fits), so the count lands exactly on `length`.
    """

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    # Fast: a word's tokens counted on their own (a byte-level BPE splits text before each
    # space, so they add up); checked once at the end, exact word by word if that fails.
    text = _fill(count, index, length, seed, whole=False)
    return text if count(text) == length else _fill(count, index, length, seed, whole=True)


def _fill(count: Callable[[str], int], index: int, length: int, seed: int, whole: bool) -> str:
    rng = random.Random(f"{seed}-{index}")
    words = rng.choice(SENTENCES).split()
    words = words[rng.randrange(len(words)) :]  # start anywhere in the first sentence
    text, n = "", 0
    for _ in range(10 * length + 100):  # sentences; each adds a word while any fits
        for word in words:
            piece = f" {word}" if text else word
            grown = count(text + piece) if whole else n + count(piece)
            if grown <= length:
                text, n = text + piece, grown
            if n == length:
                return text
        words = rng.choice(SENTENCES).split()
    raise ValueError(f"no text of exactly {length} tokens from the corpus (prompt {index})")
