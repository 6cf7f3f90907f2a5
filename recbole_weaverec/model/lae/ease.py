"""EASE (Steck, WWW 2019): B = -P·diag(1/diag P), P = (XᵀX + λI)⁻¹, diag(B) = 0."""
from recbole_weaverec.checks import check_number
from recbole_weaverec.model.lae.base import LinearAutoencoder, solve_spd_inverse


class EASE(LinearAutoencoder):
    sweep_keys = ("reg_weight",)

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        check_number(config, "reg_weight", low=0, low_open=True)

    def solve(self, G, dataset):
        G.diagonal().add_(float(self.config["reg_weight"]))
        P = solve_spd_inverse(G)
        return P.div_(-P.diagonal().clone())  # column j divided by -P_jj
