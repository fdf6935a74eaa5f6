"""Networks: trunks with named taps (and the one input standardisation), heads, similarity nets. Plain torch."""
