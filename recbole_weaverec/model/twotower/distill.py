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


def one_item_history(items):
    """RecBole-style (item_seq, item_seq_len) for one-item histories."""
    return items.view(-1, 1), torch.ones(len(items), dtype=torch.long)


def distill_loss(student, teacher, kd_weight, kd_temperature):
    """CE(student, argmax teacher) + kd_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch means."""
    ce = F.cross_entropy(student, teacher.argmax(dim=-1))
    t = kd_temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1), reduction="batchmean")
    return ce + kd_weight * (t * t) * kl


@torch.no_grad()
def teacher_embeddings(model, batch_size):
    """(pseudo-user embeddings [n-1, d], item embeddings [n-1, d]) of a fine-tuned domain model (items 1..n-1)."""
    tower = model.tower
    items = torch.arange(1, model.n_items)
    user_inputs = tower.user_inputs(*one_item_history(items))
    item_inputs = tower.item_inputs(items.tolist())
    users = tower.encode_all(user_inputs, batch_size, desc="teacher pseudo-users")
    same = user_inputs == item_inputs  # a one-item history is usually the item's own text: encode once
    catalogue = users if same else tower.encode_all(item_inputs, batch_size, desc="teacher items")
    return users.cpu(), catalogue.cpu()


class CoefficientLearner:
    """Learns the merging coefficients c ([K] task-wise or [K, L] layer-wise) of θ = θ_base + Σ_k c_k·τ̂_k.

    ``student`` is a TextSeqRec whose encoder weights are never trained: each step builds the merged weights from
    the coefficients (``merging.combine_task_vectors``, differentiable in c) and runs the encoder on them with
    ``functional_call``. Student item embeddings are encoded once with the initial merge and kept frozen.
    """

    def __init__(self, student, base_state, prepared, init, layer_of, towers, teachers, lr, batch_size,
                 kd_weight, kd_temperature, encode_batch_size, seed=0):
        from recbole_weaverec.merging import combine_task_vectors

        self.combine = combine_task_vectors
        self.student = student
        for p in student.parameters():
            p.requires_grad_(False)
        device = next(student.parameters()).device
        self.base = {k: v.to(device) for k, v in base_state.items()}
        self.prepared = [{k: v.to(device) for k, v in tv.items()} for tv in prepared]
        self.layer_of = layer_of
        self.coefficients = torch.nn.Parameter(init.clone().float().to(device))
        self.optimizer = torch.optim.Adam([self.coefficients], lr=lr)
        self.towers = towers  # per domain: the TextTower holding that domain's tokenised item texts
        self.teachers = teachers  # per domain: (teacher pseudo-user emb, teacher item emb)
        self.batch_size = batch_size
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.users = pseudo_users([t[1].shape[0] + 1 for t in teachers])
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = None, 0
        with torch.no_grad():
            params = self.merged_params()
            self.student_items = [tower.encode_all(tower.item_inputs(range(1, t[1].shape[0] + 1)), encode_batch_size,
                                                   params=params, desc="student items")
                                  for tower, t in zip(towers, teachers)]

    def merged_params(self, coefficients=None):
        c = self.coefficients if coefficients is None else coefficients
        return self.combine(self.base, self.prepared, c, self.layer_of)

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
        device = self.coefficients.device
        return t_user[items - 1].to(device) @ t_items.to(device).T

    def loss(self, domains, items):
        params = self.merged_params()
        total = 0.0
        for d in domains.unique().tolist():
            sel = domains == d
            it = items[sel]
            tower = self.towers[d]
            user = tower.encode(tower.user_inputs(*one_item_history(it)), params=params)
            teacher = self.teacher_scores(d, it)
            student = user @ self.student_items[d].T
            # per-domain mean weighted by its share: the batch loss is the mean over all pseudo-users
            total = total + distill_loss(student, teacher, self.kd_weight, self.kd_temperature) * sel.sum() / len(items)
        return total

    def step(self, batch=None):
        """One Adam step on ``batch`` (domains, items), by default the next shuffled batch; returns the loss."""
        self.optimizer.zero_grad()
        loss = self.loss(*(batch if batch is not None else self.next_batch()))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
