"""Running audits for a dashboard shared by a team: the background job manager, run ownership across
processes, and who may do what (roles).
"""
