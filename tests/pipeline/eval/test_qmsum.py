"""QMSum study: transcript parsing, turn chunks, relevance (pure functions: no encoder).

The study end to end lives in tests/jobs/test_eval.py.
"""

from __future__ import annotations

import pytest

from pipeline.eval.qmsum import StudyConfig, parse_meeting, relevant_chunks, span_turns, turn_chunks


@pytest.fixture
def meeting():
    row = {
        "meeting_transcripts": [{"speaker": f"S{i}", "content": f"turn {i} text"} for i in range(7)],
        "specific_query_list": [
            {"query": "about turns 2-3?", "answer": "", "relevant_text_span": [["2", "3"]]},
            {"query": "about 0 and 6?", "answer": "", "relevant_text_span": [["0", "0"], ["6", "6"]]},
        ],
    }
    return parse_meeting("m0", row)


def test_meeting_transcript_and_turn_spans(meeting):
    lines = meeting.text.split("\n")
    assert lines[0] == "S0: turn 0 text" and len(lines) == 7
    assert [meeting.text[s:e] for s, e in meeting.turns] == lines
    assert meeting.queries[1] == ("about 0 and 6?", ((0, 0), (6, 6)))


def test_turn_chunks_and_relevance(meeting):
    chunks = turn_chunks(meeting, 3)  # turns 0-2, 3-5, 6
    assert [(c.first_turn, c.last_turn) for c in chunks] == [(0, 2), (3, 5), (6, 6)]
    assert meeting.text[chunks[1].start : chunks[1].end] == "\n".join(meeting.text.split("\n")[3:6])
    assert relevant_chunks(chunks, [(2, 3)]) == [0, 1]  # the span straddles a chunk boundary
    assert relevant_chunks(chunks, [(0, 0), (6, 6)]) == [0, 2]
    assert relevant_chunks(chunks, [(9, 12)]) == []  # outside the transcript: nothing relevant


def test_span_turns_maps_character_spans_to_overlapping_turns(meeting):
    (s0, e0), (s1, e1), (s2, _) = meeting.turns[:3]
    assert span_turns(meeting.turns, s0, e0) == (0, 0)
    assert span_turns(meeting.turns, s0 + 4, s1 + 2) == (0, 1)
    assert span_turns(meeting.turns, e1 - 1, s2 + 1) == (1, 2)  # spans the "\n" between turns 1 and 2
    with pytest.raises(ValueError, match="overlaps no turn"):
        span_turns(meeting.turns, e0, e0 + 1)  # only the newline


def test_study_config_needs_one_chunk_size():
    with pytest.raises(ValueError, match="exactly one of chunk_turns and chunk_tokens"):
        StudyConfig(data="x", chunk_turns=5, chunk_tokens=128).validate()
    with pytest.raises(ValueError, match="0 <= overlap < window"):
        StudyConfig(data="x", long_late=((128, 128),)).validate()
