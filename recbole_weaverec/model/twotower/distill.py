"""MergeRec steps (2) and (3): pseudo-users with teacher scores, and learning only the merging coefficients.

No real interaction is used here: a pseudo-user is one item of a domain as a one-item history, and the teacher is that
domain's fine-tuned model (its cosine scores over the domain's own catalogue). Logits are cosine similarities, as in
the paper's code: the CE term uses them as they are, the KD term divides them by ``kd_temperature`` (and is scaled
by its square, Hinton-style).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PseudoUsers:
    domain: torch.Tensor  # [N] index into the domain list
    item: torch.Tensor  # [N] the item (internal id of its domain) that is the user's whole history

    def __len__(self):
        return len(self.item)


def pseudo_users(item_counts):
    """One one-item sequence per item of each domain: ``item_counts[d]`` = that domain's n_items (0 = padding)."""
    domains, items = [], []
    for d, n in enumerate(item_counts):
        items.append(torch.arange(1, n))
        domains.append(torch.full((n - 1,), d))
    return PseudoUsers(torch.cat(domains), torch.cat(items))


def split_pseudo_users(users, ratio, seed=0):
    """(train, held out): ``ratio`` of each domain's pseudo-users held out (at least one when ``ratio`` > 0), drawn
    with their own ``seed``, so every merge seed and every merge method is judged on the same held-out items."""
    if ratio <= 0:
        return users, PseudoUsers(users.domain[:0], users.item[:0])
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(users), dtype=torch.bool)
    for d in users.domain.unique().tolist():
        where = (users.domain == d).nonzero().view(-1)
        n = max(1, round(ratio * len(where)))
        held[where[torch.randperm(len(where), generator=generator)[:n]]] = True
    return (PseudoUsers(users.domain[~held], users.item[~held]), PseudoUsers(users.domain[held], users.item[held]))


def one_item_history(items):
    """RecBole-style (item_seq, item_seq_len) for one-item histories."""
    return items.view(-1, 1), torch.ones(len(items), dtype=torch.long)


def distill_loss(student, teacher, kd_weight, kd_temperature, reduction="mean"):
    """CE(student, argmax teacher) + kd_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch means
    (``reduction="none"``: one value per row)."""
    ce = F.cross_entropy(student, teacher.argmax(dim=-1), reduction="none")
    t = kd_temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1), reduction="none").sum(-1)
    per_row = ce + kd_weight * (t * t) * kl
    return per_row if reduction == "none" else per_row.mean()


@torch.no_grad()
def held_out_objective(towers, teachers, params, held_out, kd_weight, kd_temperature, batch_size):
    """The distillation objective of merged weights ``params`` on the ``held_out`` pseudo-users (mean over them),
    with the merge's *own* item embeddings (the learner keeps its initial merge's): a function of the weights alone,
    so any merge (training-free or learned) can be placed on it. ``teachers``: per domain (pseudo-user emb, item
    emb, pseudo-user inputs) from ``teacher_embeddings``."""
    total, count = 0.0, 0
    for d, (tower, (t_users, t_items, inputs)) in enumerate(zip(towers, teachers)):
        items = held_out.item[held_out.domain == d]
        if not len(items):
            continue
        item_inputs = tower.item_inputs(range(1, t_items.shape[0] + 1))
        catalogue = tower.encode_all(item_inputs, batch_size, params=params, desc="held-out objective")
        if inputs == item_inputs:  # one-item histories are the items' own texts: their rows, not a second pass
            user = catalogue[items.to(catalogue.device) - 1]
        else:
            user = tower.encode_all([inputs[i - 1] for i in items.tolist()], batch_size, params=params)
        t_users, t_items = t_users.to(catalogue.device), t_items.to(catalogue.device)
        rows_of = items.to(catalogue.device) - 1
        for start in range(0, len(items), batch_size):  # [batch, n_items] score blocks (teacher too), never [all, n]
            rows = slice(start, start + batch_size)
            teacher = t_users[rows_of[rows]] @ t_items.T
            total += float(distill_loss(user[rows] @ catalogue.T, teacher, kd_weight, kd_temperature,
                                        reduction="none").sum())
        count += len(items)
    return total / max(count, 1)


@torch.no_grad()
def teacher_embeddings(tower, n_items, batch_size, params=None):
    """(pseudo-user embeddings [n-1, d], item embeddings [n-1, d], pseudo-user inputs) of domain model ``params`` on
    ``tower``'s items 1..n-1, on the encoder's device; the item embeddings are the same tensor when every one-item
    history is the item's own text (encoded once)."""
    items = torch.arange(1, n_items)
    user_inputs = tower.user_inputs(*one_item_history(items))
    item_inputs = tower.item_inputs(items)
    users = tower.encode_all(user_inputs, batch_size, params=params, desc="teacher pseudo-users")
    same = user_inputs == item_inputs  # a one-item history is usually the item's own text: encode once
    catalogue = users if same else tower.encode_all(item_inputs, batch_size, params=params, desc="teacher items")
    return users, catalogue, user_inputs


class CoefficientLearner:
    """Learns the merging coefficients c ([K] task-wise or [K, L] layer-wise) of θ = θ_base + Σ_k c_k·τ̂_k.

    ``stacked`` (``StackedTaskVectors``) builds the merged weights from c, differentiably; the encoder runs on them
    with ``functional_call`` and its own weights are never trained. Each step is one encoder forward over the whole
    batch, whatever domains its pseudo-users come from (all towers share one encoder and tokenizer; a tower only
    holds its domain's item texts). The teachers' embeddings are computed before (``teacher_embeddings``) and kept
    on the device; the student's item embeddings are encoded once with the initial merge and kept frozen.
    """

    def __init__(self, student, stacked, init, towers, teachers, lr, batch_size, kd_weight, kd_temperature,
                 encode_batch_size, seed=0, valid_ratio=0.0):
        self.student = student
        encoder = towers[0].encoder
        for module in (student, encoder):
            for p in module.parameters():
                p.requires_grad_(False)
        encoder.eval()  # no dropout in the student, as the teachers had none
        self.stacked = stacked
        device = stacked.device
        self.coefficients = torch.nn.Parameter(init.clone().float().to(device))
        self.optimizer = torch.optim.Adam([self.coefficients], lr=lr)
        self.towers = towers  # per domain: the TextTower holding that domain's tokenised item texts
        # per domain: (teacher pseudo-user emb, teacher item emb) on the device, moved once (one tensor when they
        # are the same), and the pseudo-users' token ids, built once for the teacher
        self.teachers, self.user_inputs = [], []
        for users, items, inputs in teachers:
            moved = users.to(device)
            self.teachers.append((moved, moved if items is users else items.to(device)))
            self.user_inputs.append(inputs)
        self.batch_size = batch_size
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        # held-out pseudo-users (``valid_ratio`` of each domain; the split has its own fixed seed): never trained on,
        # their loss (``valid_loss``) tells whether learning lowers the objective beyond the batches it saw
        self.users, self.held_out = split_pseudo_users(pseudo_users([t[1].shape[0] + 1 for t in self.teachers]),
                                                       valid_ratio)
        self.encode_batch_size = encode_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = None, 0
        with torch.no_grad():
            params = self.merged_params()
            self.student_items = [tower.encode_all(tower.item_inputs(range(1, t[1].shape[0] + 1)), encode_batch_size,
                                                   params=params, desc="student items")
                                  for tower, t in zip(towers, self.teachers)]

    def merged_params(self, coefficients=None):
        return self.stacked.merged(self.coefficients if coefficients is None else coefficients)

    def next_batch(self):
        """Shuffled pass over all pseudo-users of all domains (a new permutation each epoch)."""
        if self._order is None or self._pos >= len(self._order):
            self._order = torch.randperm(len(self.users), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.users.domain[idx], self.users.item[idx]

    def teacher_scores(self, domain, items):
        """Domain ``domain``'s teacher: cosine of each pseudo-user (one item) with every item 1..n-1 (column j = item
        j+1)."""
        t_user, t_items = self.teachers[domain]
        return t_user[items.to(t_user.device) - 1] @ t_items.T

    def loss(self, domains, items, params=None):
        params = self.merged_params() if params is None else params
        inputs = [self.user_inputs[d][i - 1] for d, i in zip(domains.tolist(), items.tolist())]
        user = self.towers[0].encode(inputs, params=params)  # the batch's one forward
        total = 0.0
        for d in domains.unique().tolist():
            sel = domains == d
            it = items[sel]
            student = user[sel.to(user.device)] @ self.student_items[d].T
            teacher = self.teacher_scores(d, it)
            # per-domain mean weighted by its share: the batch loss is the mean over all pseudo-users
            share = int(sel.sum())
            total = total + distill_loss(student, teacher, self.kd_weight, self.kd_temperature) * share / len(items)
        return total

    @torch.no_grad()
    def valid_loss(self):
        """The learner's own loss (student items frozen at the initial merge) on the held-out pseudo-users, or None
        when there are none."""
        n = len(self.held_out)
        if not n:
            return None
        params = self.merged_params()
        total = 0.0
        for start in range(0, n, self.encode_batch_size):
            domains = self.held_out.domain[start:start + self.encode_batch_size]
            items = self.held_out.item[start:start + self.encode_batch_size]
            total += float(self.loss(domains, items, params=params)) * len(items)
        return total / n

    def step(self, batch=None):
        """One Adam step on ``batch`` (domains, items), by default the next shuffled batch; returns the loss."""
        self.optimizer.zero_grad()
        loss = self.loss(*(batch if batch is not None else self.next_batch()))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
