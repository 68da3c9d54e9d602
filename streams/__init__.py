"""actprm.streams"""
