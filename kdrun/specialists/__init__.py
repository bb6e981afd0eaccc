"""Specialist models with a dustbin class (Hinton, Vinyals & Dean 2015, section 5): the math."""
