"""The leaderboard's one error (defined with all errors in ``recbole_weaverec.errors``): a bad board config (or
``--only``), raised with a message naming the key."""
from recbole_weaverec.errors import LeaderboardConfigError


def _fail(msg):
    raise LeaderboardConfigError(msg)
