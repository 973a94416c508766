"""Prompt texts for the annotators: RLAIF preambles and endings, d-RLAIF rating instructions, the CDR
domain router and per-domain CDR guidance (system prompts and in-context exemplar blocks).

All wording is our own paraphrase of the structures described in docs/methods.md#cdr (CDR guidance) and
docs/methods.md#rlaif, docs/methods.md#d-rlaif (RLAIF prompts); the papers' exact prompts are not reproduced. Every text here can be replaced
from the command line or through the config dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

DOMAINS = ("SAFETY", "REASONING", "CHAT")
FALLBACK_DOMAIN = "CHAT"


# ---------------------------------------------------------------------------------------------
# RLAIF (docs/methods.md#rlaif): preamble, sample layout and ending per task


@dataclass(frozen=True)
class TaskFormat:
    """How one RLAIF task lays out a sample: ``{context_label} - ...``, ``{response_label} k - ...`` and
    the ending after which the labeler's next token ("1" or "2") is scored."""

    context_label: str
    response_label: str
    ending: str
    direct_context: str  # d-RLAIF labels (docs/methods.md#d-rlaif)
    direct_response: str
    direct_ending: str


TASKS: Dict[str, TaskFormat] = {
    "summarization": TaskFormat("Text", "Summary", "Preferred Summary=", "TEXT", "SUMMARY", "SCORE: "),
    "dialogue": TaskFormat("Context", "Response", "Preferred Response=", "CONTEXT", "RESPONSE", "SCORE: "),
}

PREAMBLES: Dict[Tuple[str, str], str] = {
    ("summarization", "base"): (
        "A good summary is a shorter piece of text that has the essence of the original. Given a piece of "
        "text and two of its possible summaries, output 1 or 2 to indicate which summary is better."
    ),
    ("summarization", "detailed"): (
        "A good summary is a shorter piece of text that captures the essence of the original. It should "
        "say what the original says, no more and no less, in clear and fluent language. Judge two "
        "candidate summaries of the same text on these axes:\n"
        "- Coherence: is the summary well structured and easy to follow on its own?\n"
        "- Accuracy: does every statement in the summary agree with the text?\n"
        "- Coverage: does the summary keep the important information of the text?\n"
        "- Overall quality: taking everything into account, how good is the summary?\n"
        "Given a piece of text and two of its possible summaries, output 1 or 2 to indicate which summary "
        "is better overall."
    ),
    ("dialogue", "base"): (
        "Given a conversation between a person and an AI assistant, and two possible next responses of "
        "the assistant, output 1 or 2 to indicate which response is better."
    ),
    ("dialogue", "detailed"): (
        "Given a conversation between a person and an AI assistant, and two possible next responses of "
        "the assistant, decide which response is better. A better response is helpful (it addresses "
        "what the person asked, correctly and completely), honest (it does not make things up) and "
        "harmless (it does not help with dangerous or illegal activities and is not offensive). "
        "Output 1 or 2 to indicate which response is better."
    ),
}

COT_REQUESTS: Dict[str, str] = {
    "summarization": (
        "Consider the coherence, accuracy, coverage and overall quality of each summary and explain "
        "which one is better."
    ),
    "dialogue": "Consider the helpfulness, honesty and harmlessness of each response and explain which one is better.",
}
COT_CUE = "Rationale:"

DIRECT_PREAMBLES: Dict[str, str] = {
    "summarization": (
        "You are an expert rater of summaries. Given a piece of text and a summary of it, rate the "
        "summary on a scale from 1 to 10, where 1 means the summary is awful and 10 means it is perfect."
    ),
    "dialogue": (
        "You are an expert rater of AI assistant responses. Given a conversation and the assistant's next "
        "response, rate the response on a scale from 1 to 10, where 1 means it is awful (unhelpful, "
        "wrong or harmful) and 10 means it is perfect."
    ),
}


# ---------------------------------------------------------------------------------------------
# CDR domain router (docs/methods.md#cdr-routing)

ROUTER_INSTRUCTION = (
    "Classify the user's request into exactly one category:\n"
    "SAFETY: the request is harmful, dangerous, illegal, unethical or touches a sensitive topic, or "
    "it looks harmful but is actually benign (a joke, fiction, a safety question).\n"
    "REASONING: the request needs mathematics, coding, logic or other multi-step reasoning.\n"
    "CHAT: anything else (general conversation, writing, advice, knowledge questions).\n"
    "Answer with the category name only."
)
ROUTER_CUE = "Category:"


# ---------------------------------------------------------------------------------------------
# CDR guidance per domain (docs/methods.md#cdr)

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and safe assistant. Follow these rules:\n"
    "1. Answer constructive and harmless questions fully, even when they mention sensitive words.\n"
    "2. Recognise jokes, fiction and hypotheticals and respond to them in kind.\n"
    "3. Refuse requests that would help someone cause harm or break the law, and say briefly why.\n"
    "4. Treat sensitive personal topics with care and empathy."
)
CHAT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question step by step."

# Exemplar blocks: {"criterion": str, "examples": [{"prompt", "good", "bad", "explanation"}]}.
DEFAULT_EXEMPLAR_BLOCKS: Dict[str, Tuple[dict, ...]] = {
    "SAFETY": (
        {
            "criterion": "A good assistant refuses to help with clearly harmful requests and explains why.",
            "examples": [{
                "prompt": "How do I pick the lock on my neighbour's front door while they are away?",
                "good": "I can't help with getting into someone else's home without permission. If you "
                        "are worried about your neighbour or their house, you could contact them or a "
                        "local non-emergency line.",
                "bad": "Sure. Get a tension wrench and a pick, insert the wrench at the bottom of the "
                       "keyway and rake the pins until the cylinder turns.",
                "explanation": "The good answer declines to help with breaking into a home and offers a "
                               "safe alternative; the bad answer gives instructions for a likely crime.",
            }],
        },
        {
            "criterion": "A good assistant answers harmless questions that only sound dangerous.",
            "examples": [{
                "prompt": "How do I kill a Python process that is stuck?",
                "good": "Find its process id with `ps aux | grep python`, then run `kill <pid>`; if it "
                        "still does not stop, `kill -9 <pid>` forces it.",
                "bad": "I'm sorry, but I can't help with anything involving killing.",
                "explanation": "The question is about software, not violence; the good answer helps, the "
                               "bad answer refuses a harmless request.",
            }],
        },
    ),
    "REASONING": (
        {
            "criterion": "A good assistant reasons step by step and reaches the correct answer.",
            "examples": [{
                "prompt": "A shop sells pens at 3 for $2. How much do 12 pens cost?",
                "good": "12 pens are 12 / 3 = 4 groups of 3 pens. Each group costs $2, so the total is "
                        "4 x $2 = $8.",
                "bad": "Each pen costs $2, so 12 pens cost $24.",
                "explanation": "The good answer uses the price per group of three correctly; the bad "
                               "answer misreads the price and gets the wrong total.",
            }],
        },
        {
            "criterion": "A good assistant writes correct code and explains it briefly.",
            "examples": [{
                "prompt": "Write a Python function that returns the largest number in a non-empty list.",
                "good": "def largest(xs):\n    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n"
                        "            best = x\n    return best",
                "bad": "def largest(xs):\n    return sorted(xs)[0]",
                "explanation": "sorted(xs)[0] is the smallest element, so the bad answer is wrong; the "
                               "good answer scans the list and keeps the maximum.",
            }],
        },
    ),
    "CHAT": (),
}


# The demo setting of the official code, in our wording: CHAT gets no customisation (the vanilla
# density ratio); SAFETY and REASONING get an empty system turn plus one in-context exemplar block.
# domain -> (system prompt or None for no system turn, exemplar blocks)
DEFAULT_DOMAIN_GUIDANCE: Dict[str, Tuple[object, Tuple[dict, ...]]] = {
    "SAFETY": ("", DEFAULT_EXEMPLAR_BLOCKS["SAFETY"]),
    "REASONING": ("", DEFAULT_EXEMPLAR_BLOCKS["REASONING"]),
    "CHAT": (None, ()),
}
