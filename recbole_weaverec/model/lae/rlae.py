"""RLAE and RDLAE (Moon et al., "It's Enough: Relaxing Diagonal Constraints in Linear Autoencoders", SIGIR 2023).

G = XᵀX; γ = λ + diag(G)·p/(1−p) (RLAE: p = 0); C = (G + diag γ)⁻¹;
μ_j = ((1−ξ)/C_jj − γ_j)·1[1 − γ_j·C_jj > ξ]; W = −C·diag(γ + μ); diag(W) = 0.
ξ relaxes the zero-diagonal constraint (ξ = 0 gives EASE); p is the dropout-derived per-item penalty.
"""
from recbole_weaverec.checks import check_number
from recbole_weaverec.model.lae.base import LinearAutoencoder, solve_spd_inverse


class RLAE(LinearAutoencoder):
    drop_p_key = None  # RLAE has no dropout penalty
    sweep_keys = ("reg_weight", "xi")

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        check_number(config, "reg_weight", low=0, low_open=True)
        check_number(config, "xi", low=0, high=1, high_open=True)
        if cls.drop_p_key:
            check_number(config, cls.drop_p_key, low=0, high=1, high_open=True)

    def solve(self, G, dataset):
        p = float(self.config[self.drop_p_key]) if self.drop_p_key else 0.0
        xi = float(self.config["xi"])
        gamma = float(self.config["reg_weight"]) + G.diagonal() * (p / (1.0 - p))
        G.diagonal().add_(gamma)
        C = solve_spd_inverse(G)
        c = C.diagonal().clone()
        mu = ((1.0 - xi) / c - gamma) * (1.0 - gamma * c > xi)
        return C.mul_(-(gamma + mu))  # column j times -(γ_j + μ_j)


class RDLAE(RLAE):
    drop_p_key = "drop_p"
    sweep_keys = ("reg_weight", "xi", "drop_p")
