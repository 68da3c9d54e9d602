"""actprm.model"""
