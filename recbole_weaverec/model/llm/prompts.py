"""Instruction prompts from item titles, through the tokenizer's chat template.

Format (the reference's task, our wording): a system turn, then a user turn listing the user's purchase history
(titles, oldest first, the last ``max_history`` items, each cut to ``max_title_tokens`` tokens) and, when
``prompt_candidates`` is on, the candidate titles; the assistant's answer is the next item's title followed by the
template's end-of-turn marker. Only the answer tokens carry the loss, and a candidate's score is the log-likelihood of
that same answer, so training and scoring see identical token sequences.

``max_prompt_tokens`` caps the prompt (the tokens before the answer), in training and scoring alike: an over-long
prompt drops its oldest history items, whole, until it fits; the candidate list and the answer are never cut.

Evaluation here is not the reference's: a candidate's score is the length-normalised log-likelihood of its answer
(``scoring.py``) and RecBole ranks the 30 candidates by it, while the reference (WeaveRec's public code) generates an
answer greedily and exact-matches it against the candidate titles. Numbers put beside the paper's must say so.
"""
from recbole_weaverec.errors import ConfigError

SYSTEM_PROMPT = "You are a helpful assistant that recommends products to the users of an online shop."
SEPARATOR = " || "
IGNORE_INDEX = -100  # label of tokens without loss (transformers' convention)


class PromptBuilder:
    def __init__(self, tokenizer, max_history=5, max_title_tokens=12, prompt_candidates=True, max_prompt_tokens=None):
        self.tokenizer = tokenizer
        self.max_history = int(max_history)
        self.max_title_tokens = int(max_title_tokens)
        self.prompt_candidates = bool(prompt_candidates)
        self.max_prompt_tokens = None if max_prompt_tokens is None else int(max_prompt_tokens)
        self._titles = {}  # raw title -> truncated title
        self._answers = {}  # truncated title -> answer token ids
        self.end_of_turn = self._end_of_turn()

    # --- text -------------------------------------------------------------------------------------------------
    def truncate(self, title):
        """``title`` cut to at most ``max_title_tokens`` tokens (cached: titles repeat across prompts)."""
        out = self._titles.get(title)
        if out is None:
            ids = self.tokenizer(title, add_special_tokens=False)["input_ids"]
            out = title if len(ids) <= self.max_title_tokens else \
                self.tokenizer.decode(ids[:self.max_title_tokens]).strip()
            self._titles[title] = out
        return out

    def user_text(self, history_titles, candidate_titles=None):
        history = [self.truncate(t) for t in list(history_titles)[-self.max_history:]] if self.max_history else []
        text = ("Here is the purchase history of a user, oldest first: ["
                + SEPARATOR.join(history) + "].")
        if self.prompt_candidates and candidate_titles is not None:
            text += (" Choose the product the user is most likely to buy next among these candidates: ["
                     + SEPARATOR.join(self.truncate(t) for t in candidate_titles) + "].")
        else:
            text += " Which product is the user most likely to buy next?"
        return text + " Answer with its title only."

    def messages(self, history_titles, candidate_titles=None):
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.user_text(history_titles, candidate_titles)}]

    def prompt_text(self, history_titles, candidate_titles=None):
        messages = self.messages(history_titles, candidate_titles)
        if self.tokenizer.chat_template is None:  # a base (non-instruct) model: a plain transcript
            return f"{messages[0]['content']}\n\nUser: {messages[1]['content']}\nAssistant: "
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _end_of_turn(self):
        """What the chat template writes after an assistant answer (e.g. ``<|im_end|>``), trailing space removed."""
        if self.tokenizer.chat_template is None:
            return self.tokenizer.eos_token or ""
        marker = "\x01ANSWER\x01"
        messages = self.messages(["a"]) + [{"role": "assistant", "content": marker}]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return full[full.index(marker) + len(marker):].rstrip()

    # --- token ids --------------------------------------------------------------------------------------------
    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, history_titles, candidate_titles=None):
        """Token ids of the prompt, within ``max_prompt_tokens`` when set: the longest run of the newest history
        items that fits is kept (oldest items dropped whole); the candidates are never cut."""
        history = list(history_titles)[-self.max_history:] if self.max_history else []
        ids = self.encode(self.prompt_text(history, candidate_titles))
        cap = self.max_prompt_tokens
        if cap is None or len(ids) <= cap:
            return ids

        def without(k):  # the prompt with the k oldest items dropped
            return self.encode(self.prompt_text(history[k:], candidate_titles))

        # tokens are nearly additive: jump past as many oldest items as cover the excess, then step to the exact k
        excess, k = len(ids) - cap, 0
        while k < len(history) and excess > 0:
            excess -= len(self.encode(self.truncate(history[k]) + SEPARATOR))
            k += 1
        ids = without(k)
        while len(ids) > cap:
            if k >= len(history):
                raise ConfigError(f"max_prompt_tokens={cap} is too small: the prompt takes {len(ids)} tokens with no "
                                  f"history item left (the candidate list is never cut); raise max_prompt_tokens or "
                                  f"lower max_title_tokens / num_prompt_candidates")
            k += 1
            ids = without(k)
        while k > 1:  # one item fewer dropped may still fit (tokenisation is not exactly additive)
            longer = without(k - 1)
            if len(longer) > cap:
                break
            k, ids = k - 1, longer
        return ids

    def answer_ids(self, title):
        """Token ids of the answer ``title`` + end-of-turn (tokenised apart from the prompt, as in scoring)."""
        title = self.truncate(title)
        out = self._answers.get(title)
        if out is None:
            out = self._answers[title] = self.encode(title + self.end_of_turn)
        return out

    def training_ids(self, history_titles, answer_title, candidate_titles=None):
        """(input_ids, labels): labels are IGNORE_INDEX on the prompt, the answer's ids on the answer."""
        prompt = self.prompt_ids(history_titles, candidate_titles)
        answer = self.answer_ids(answer_title)
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
