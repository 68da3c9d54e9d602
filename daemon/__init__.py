"""actprm.daemon"""
