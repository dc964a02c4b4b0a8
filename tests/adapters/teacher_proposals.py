"""Shared by the mean-teacher adapters' tests of `semi.teacher_proposals`: a config whose RPN keeps 37
proposals per image at train time and 11 at test time, and a counter of the teacher's proposals."""

TRAIN_TOP_N, TEST_TOP_N = 37, 11


def with_teacher_proposals(cfg, mode: str):
    model = cfg.model.model_copy(update={"rpn_pre_nms_top_n_train": 400, "rpn_post_nms_top_n_train": TRAIN_TOP_N,
                                         "rpn_pre_nms_top_n_test": 400, "rpn_post_nms_top_n_test": TEST_TOP_N})
    return cfg.model_copy(update={"model": model, "semi": cfg.semi.model_copy(update={"teacher_proposals": mode})})


def count_teacher_proposals(adapter) -> list[int]:
    """Proposals per image of every teacher RPN call from now on (the list fills as it runs)."""
    counts: list[int] = []
    rpn_forward = adapter.teacher.rpn.forward

    def counting(*args, **kwargs):
        boxes, losses = rpn_forward(*args, **kwargs)
        counts.extend(len(b) for b in boxes)
        return boxes, losses

    adapter.teacher.rpn.forward = counting
    return counts
