{{/* The release's name for its objects: <release>-kiam, or the release name when it says kiam. */}}
{{- define "kiam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "kiam" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kiam.server" -}}{{ include "kiam.fullname" . }}-server{{- end -}}
{{- define "kiam.agent" -}}{{ include "kiam.fullname" . }}-agent{{- end -}}

{{/* Labels every object carries. */}}
{{- define "kiam.labels" -}}
app.kubernetes.io/name: {{ default "kiam" .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kiam
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* What selects one component's pods of this release. */}}
{{- define "kiam.selector" -}}
app.kubernetes.io/name: {{ default "kiam" .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kiam.serverHost" -}}
{{ include "kiam.server" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "kiam.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ default .root.Chart.AppVersion .image.tag }}
{{- end -}}
{{- end -}}
