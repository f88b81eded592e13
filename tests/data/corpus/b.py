import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
import math


def norm(p):
    return math.sqrt(p.x * p.x + p.y * p.y)
